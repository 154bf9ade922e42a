"""Colorization (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016), as one task
of Doersch & Zisserman's multi-task training.

The trunk sees the lightness L alone (as a grey RGB image) and the head predicts, for each
cell of block3's grid, a distribution over the 313 in-gamut ab bins (`col_encoding`). The
target of a cell is its mean ab, soft-encoded over the 5 nearest bins; the loss is the
multinomial cross-entropy, each cell weighted by the rebalancing weight of its nearest bin
(lambda 0.5 over an empirical prior), so rare saturated colours count.

Output stride and resolution: block3 runs at stride 16 (atrous) by default, so a 224 px
crop gives a 14 x 14 grid of 16 px cells (stride 8: 28 x 28; stride 32: 7 x 7). The
pipeline hands over the crop's mean ab and peak chroma per 8 px cell; the step pools them to
the head's grid and encodes them there (a table lookup), whatever the stride.

Grey carries no colour: a cell whose pixels all have chroma below `min_chroma` (grey
photos, grey insets, borders) is left out of the loss and the metrics, crops with less than
`min_colour_fraction` of colour cells are dropped, and a source without any colour photo is
an error at start. Class rebalancing needs the ab prior of the training data:

    python -m mtss_train.tasks.col_prior --data DIR --out DIR_prior.npy
    python -m mtss_train --tasks col --data DIR --task_param col.prior=DIR_prior.npy

Without `col.prior` the prior of the bundled sample photos is used ("sample"); "uniform"
turns rebalancing off.
"""

import dataclasses
import functools
import os
from typing import Callable

import numpy as np
from absl import logging

from mtss_train import colorspace
from mtss_train.compat import slim, tf
from mtss_train.data.images import image_source
from mtss_train.data.source import Source
from mtss_train.errors import DataError, MtssError
from mtss_train.task import MIN_IMAGE_SIDE, Batch, Metric, Task, TaskConfig, register_task
from mtss_train.tasks import col_encoding as encoding

# The pipeline summarizes ab over CELL x CELL pixels: the finest output stride (8).
CELL = 8
# Images drawn from a source to check that it holds colour photos.
PROBE_IMAGES = 32


def colour_cells(rgb: tf.Tensor, cell: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean ab and peak chroma of each `cell` x `cell` block of an image.

    Args:
      rgb: [H, W, 3] uint8 (or float in [0, 255]); H and W multiples of `cell`.
      cell: block side in pixels.

    Returns:
      (ab [H/cell, W/cell, 2] float32, chroma [H/cell, W/cell] float32: the largest
      sqrt(a^2 + b^2) of the block's pixels).
    """
    ab = colorspace.rgb_to_lab(rgb)[None, ..., 1:]
    chroma = tf.norm(ab, axis=-1, keepdims=True)
    mean_ab = tf.nn.avg_pool2d(ab, cell, cell, "VALID")[0]
    return mean_ab, tf.nn.max_pool2d(chroma, cell, cell, "VALID")[0, ..., 0]


def image_counts(image: tf.Tensor, side: int, cell: int, min_chroma: float) -> tf.Tensor:
    """Bin counts [313] float32 of one RGB uint8 image [H, W, 3]: its short side scaled to
    `side`, cut into `cell` px cells (the rest dropped), each colour cell (peak chroma >=
    `min_chroma`) counted at the nearest bin of its mean ab."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.cast(tf.round(shape * side / tf.reduce_min(shape)), tf.int32) // cell * cell
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.maximum(size, cell), antialias=True)
    ab, chroma = colour_cells(tf.clip_by_value(resized, 0.0, 255.0), cell)
    return encoding.bin_histogram(ab, chroma >= min_chroma)


def estimate_counts(images: tf.data.Dataset, count: int, config: "Colorization.Config",
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """(bin counts [313] float64, images read) over the first `count` images of `images`,
    with cells as col trains on them (`config`: resize_side, output_stride, min_chroma)."""
    histograms = images.take(count).map(
        lambda image: image_counts(image, config.resize_side, config.output_stride, config.min_chroma),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    total = np.zeros(encoding.NUM_BINS)
    read = 0
    for histogram in histograms.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        total += histogram
        read += 1
        if progress:
            progress(read, count)
    return total, read


@functools.lru_cache(maxsize=1)
def sample_prior() -> np.ndarray:
    """The ab prior [313] of the bundled sample photos (the default `col.prior`)."""
    source = image_source(None, MIN_IMAGE_SIDE)
    counts, _ = estimate_counts(source.dataset(seed=0), len(source.paths), Colorization.Config())
    return counts / counts.sum()


def load_prior(spec: str) -> np.ndarray:
    """The ab prior [313] named by `col.prior`: "sample", "uniform", or a .npy file.

    Raises:
      MtssError: if the file is missing or does not hold 313 non-negative numbers.
    """
    if spec == "uniform":
        return np.ones(encoding.NUM_BINS)
    if spec == "sample":
        return sample_prior()
    hint = "compute one with: python -m mtss_train.tasks.col_prior --data DIR --out PATH"
    if not os.path.isfile(spec):
        raise MtssError(f"col.prior: no file {spec} ('sample', 'uniform' or a .npy prior); {hint}")
    try:
        prior = np.load(spec, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MtssError(f"col.prior: {spec} is not a .npy array ({e}); {hint}") from None
    if prior.shape != (encoding.NUM_BINS,) or not np.all(np.isfinite(prior)) or prior.min() < 0 or prior.sum() <= 0:
        raise MtssError(f"col.prior: {spec} must hold {encoding.NUM_BINS} non-negative numbers with a positive "
                        f"sum, got shape {prior.shape}; {hint}")
    return prior / prior.sum()


@register_task
class Colorization(Task):
    name = "col"
    source_kind = "images"
    input_colour = "grey"
    smoke_settings = {"batch_size": "8", "crop": "96", "resize_side": "128"}  # 6 x 6 cells.

    @dataclasses.dataclass
    class Config(TaskConfig):
        output_stride: int | None = 16  # 14 x 14 cells for a 224 crop.
        crop: int = 224  # Square input side; a multiple of 32, so every stride divides it.
        resize_side: int = 256  # Images are scaled so their short side is this, then cropped.
        prior: str = "sample"  # "sample", "uniform", or a .npy file from col_prior.
        rebalance: float = encoding.REBALANCE_LAMBDA  # lambda: weight of uniform in the prior.
        temperature: float = encoding.TEMPERATURE  # Of the annealed-mean decoding.
        min_chroma: float = 2.0  # A cell whose pixels all have less chroma is grey.
        min_colour_fraction: float = 0.25  # Crops with fewer colour cells are dropped.
        head_width: int = 256

        def validate(self) -> None:
            super().validate()
            if self.output_stride is None:
                raise MtssError("col.output_stride must be 8, 16 or 32 (the targets are made at that stride)")
            if self.crop < 32 or self.crop % 32:
                raise MtssError(f"col.crop must be a positive multiple of 32, got {self.crop}")
            if self.resize_side < self.crop:
                raise MtssError(f"col.resize_side ({self.resize_side}) must be >= col.crop ({self.crop})")
            if not 0 <= self.rebalance <= 1:
                raise MtssError(f"col.rebalance must be in [0, 1], got {self.rebalance}")
            if self.temperature <= 0:
                raise MtssError(f"col.temperature must be > 0, got {self.temperature}")
            if self.min_chroma < 0 or not 0 <= self.min_colour_fraction <= 1:
                raise MtssError("col needs min_chroma >= 0 and min_colour_fraction in [0, 1]")
            if self.head_width < 1:
                raise MtssError(f"col.head_width must be >= 1, got {self.head_width}")

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.prior = load_prior(config.prior)
        self.class_weights = encoding.rebalancing_weights(self.prior, config.rebalance)

    # -- data ---------------------------------------------------------------------------
    def check_source(self, source: Source, path: str | None) -> None:
        """The photos must include colour ones (see `check_colour`); user data should come
        with its own prior."""
        self.check_colour(source.dataset(seed=0), source.path)
        if path is not None and self.config.prior == "sample":
            logging.warning("col: class rebalancing uses the prior of the bundled sample photos; for %s compute "
                            "its own: python -m mtss_train.tasks.col_prior --data %s --out PRIOR.npy, then "
                            "--task_param col.prior=PRIOR.npy", path, path)

    def check_colour(self, images: tf.data.Dataset, where: str) -> None:
        """Raises DataError unless one of the first PROBE_IMAGES images gives a colour crop.

        Without this an all-grey source would stall training: every crop is filtered out.
        """
        probe = self._examples(images.take(PROBE_IMAGES), seed=0)
        if not any(float(f) >= self.config.min_colour_fraction for f in probe.map(lambda e: e["colour_fraction"])):
            raise DataError(
                f"col: none of the first {PROBE_IMAGES} images of {where} has colour (a {self.config.crop} px crop "
                f"with {self.config.min_colour_fraction:.0%} of its cells at chroma >= {self.config.min_chroma}); "
                "colorization needs colour photos: give --data (or col.data) with colour images, or drop col"
            )

    def make_dataset(self, source: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        """Batches of 'image', 'ab' and 'chroma' (see `make_example`) of colour crops only."""
        examples = self._examples(source, seed).filter(
            lambda e: e["colour_fraction"] >= self.config.min_colour_fraction
        )
        examples = examples.map(lambda e: {k: v for k, v in e.items() if k != "colour_fraction"})
        return examples.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _examples(self, images: tf.data.Dataset, seed: int) -> tf.data.Dataset:
        numbered = tf.data.Dataset.zip(images, tf.data.Dataset.counter())
        return numbered.map(
            lambda image, i: self.make_example(image, tf.stack([tf.cast(seed, tf.int64), i])),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def make_example(self, image: tf.Tensor, seed: tf.Tensor) -> Batch:
        """One example from an RGB image, all randomness drawn from `seed` ([2] int).

        Returns:
          'image': [C, C, 3] uint8 RGB crop (C = crop; the short side scaled to
          resize_side first, randomly flipped); 'ab': [C/8, C/8, 2] float32 mean ab per 8 px
          cell; 'chroma': [C/8, C/8] float32 peak chroma per cell; 'colour_fraction': []
          float32, the share of cells with chroma >= min_chroma.
        """
        c = self.config
        place_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        shape = tf.shape(image)[:2]
        # The crop's footprint in the image: C pixels of the resized image.
        side = tf.cast(tf.round(c.crop / c.resize_side * tf.cast(tf.reduce_min(shape), tf.float32)), tf.int32)
        side = tf.clip_by_value(side, 1, tf.reduce_min(shape))
        corner = tf.cast(tf.random.stateless_uniform([2], place_seed) * tf.cast(shape - side + 1, tf.float32), tf.int32)
        window = tf.slice(image, tf.concat([corner, [0]], 0), tf.stack([side, side, 3]))
        crop = tf.image.resize(tf.cast(window, tf.float32), [c.crop, c.crop], antialias=True)
        crop = tf.cast(tf.round(tf.clip_by_value(crop, 0.0, 255.0)), tf.uint8)
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        crop = tf.cond(flip, lambda: tf.reverse(crop, [1]), lambda: crop)
        ab, chroma = colour_cells(crop, CELL)
        fraction = tf.reduce_mean(tf.cast(chroma >= c.min_chroma, tf.float32))
        return {"image": crop, "ab": ab, "chroma": chroma, "colour_fraction": fraction}

    # -- model --------------------------------------------------------------------------
    def trunk_images(self, batch: Batch) -> tf.Tensor:
        return colorspace.grey_rgb(batch["image"])

    def head(self, block3: tf.Tensor, end_points: dict[str, tf.Tensor], batch: Batch,
             is_training: bool) -> dict[str, tf.Tensor]:
        # Pre-activation block3 is a raw residual sum: normalise it first, as slim's postnorm.
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        net = slim.conv2d(net, self.config.head_width, [3, 3], scope="conv1")
        logits = slim.conv2d(net, encoding.NUM_BINS, [1, 1], activation_fn=None, normalizer_fn=None, scope="logits")
        return {"logits": logits}

    def targets(self, batch: Batch, grid: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
        """(mean ab [N, h, w, 2], colour mask [N, h, w] float32 0/1) on the head's grid."""
        cells = batch["ab"].shape[1:3]
        factor = cells[0] // grid[0]
        if factor * grid[0] != cells[0] or factor * grid[1] != cells[1]:
            raise MtssError(f"col: head grid {grid} does not divide the {cells} target cells")
        ab = tf.nn.avg_pool2d(batch["ab"], factor, factor, "VALID")
        chroma = tf.nn.max_pool2d(batch["chroma"][..., None], factor, factor, "VALID")[..., 0]
        return ab, tf.cast(chroma >= self.config.min_chroma, tf.float32)

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, Metric]]:
        logits = tf.cast(outputs["logits"], tf.float32)
        ab, colour = self.targets(batch, tuple(logits.shape[1:3]))
        bins, weights = encoding.soft_encode(ab)  # [N, h, w, 5] each.
        log_p = tf.nn.log_softmax(logits)
        cross_entropy = -tf.reduce_sum(weights * tf.gather(log_p, bins, batch_dims=3), axis=-1)
        rebalanced = tf.gather(tf.constant(self.class_weights), bins[..., 0]) * cross_entropy
        cells = tf.reduce_sum(colour, axis=[1, 2])

        def colour_mean(values: tf.Tensor) -> tf.Tensor:
            """[N, h, w] -> [N]: the mean over each example's colour cells (0 if none)."""
            return tf.reduce_sum(values * colour, axis=[1, 2]) / tf.maximum(cells, 1.0)

        hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), bins[..., 0]), tf.float32)
        error = tf.norm(encoding.annealed_mean(logits, self.config.temperature) - ab, axis=-1)
        # Metrics weigh each example by its colour cells: a mean over the batch's colour cells.
        return colour_mean(rebalanced), {"accuracy": (colour_mean(hit), cells), "ab_error": (colour_mean(error), cells)}

    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """grey input | annealed-mean colorization | ground truth, side by side."""
        image = batch["image"][:4]
        size = image.shape[1:3]
        ab = encoding.annealed_mean(tf.cast(outputs["logits"][:4], tf.float32), self.config.temperature)
        lightness = colorspace.rgb_to_lab(image)[..., :1]
        coloured = colorspace.lab_to_rgb(tf.concat([lightness, tf.image.resize(ab, size)], axis=-1))
        panels = [colorspace.grey_rgb(image), coloured, tf.cast(image, tf.float32)]
        return {"grey_prediction_truth": tf.concat(panels, axis=2) / 255.0}
