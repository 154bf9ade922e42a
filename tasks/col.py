"""Colorization (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016), as one task
of Doersch & Zisserman's multi-task training.

The trunk sees the lightness L alone (as a grey RGB image) and the head predicts, for each
cell of block3's grid, a distribution over the 313 in-gamut ab bins (`col_encoding`). The
target of a cell is the ab of its centre pixel, soft-encoded over the 5 nearest bins; the
loss is the multinomial cross-entropy, each cell weighted by the rebalancing weight of its
nearest bin (lambda 0.5 over the empirical prior), so rare saturated colours count.

Targets are sampled, not averaged, as in Zhang's training net: richzhang/colorization,
models/colorization_train_val_v2.prototxt, layer 'data_ab_ss', takes the ab of every 4th
pixel (a fixed 1x1 convolution of stride 4) for its 1/4-resolution output; the average
pooling beside it is commented out. A mean over a cell mixes its colours into one that may
appear nowhere in it (red beside green averages to a dull brown), and greys every edge; a
sample is a real colour of the cell, and the random crops move the sampled pixel, so over
training each cell's target is drawn from the distribution of its pixels' colours, which
the 313-way classification is there to model. Our cells are larger (16 px at stride 16), so
the pipeline keeps the ab of every 4th pixel and the step takes the centre one of each cell.

Output stride and resolution: block3 runs at stride 16 (atrous) by default, so a 224 px
crop gives a 14 x 14 grid of 16 px cells (stride 8: 28 x 28; stride 32: 7 x 7). The
pipeline hands over the crop's ab at every SAMPLE-th pixel and its peak chroma per 8 px
cell; the step picks the head cells' centre samples and pools the chroma to the head's grid,
whatever the stride.

Grey carries no colour: a cell whose pixels all have chroma below `min_chroma` (grey
photos, grey insets, borders) is left out of the loss and the metrics, crops with less than
`min_colour_fraction` of colour cells are dropped, and a source without any colour photo is
an error at start. (Zhang's NonGrayMaskLayer, resources/caffe_traininglayers.py, masks
whole images with no |a| or |b| above 5; per cell is finer.)

Class rebalancing needs the ab prior of the data col trains on (`col_prior`). By default
(`col.prior=data`) it is computed at start from the first `col.prior_images` images of col's
training source (its --data or col.data; the bundled sample photos without either), with a
progress line, and cached under $MTSS_CACHE_DIR/col_prior (default
~/.cache/mtss_train/col_prior) by the data's identity: every file's path, size and
modification time, plus the settings that change the histogram. A changed file list
recomputes it. The log names the data, the images read, the colour cells and the cache file.
To use another prior, or to skip the computation:

    python -m mtss_train.tasks.col_prior --data DIR --out DIR_prior.npy
    python -m mtss_train --tasks col --data DIR --task_param col.prior=DIR_prior.npy

and "uniform" turns rebalancing off.
"""

import dataclasses

import numpy as np

from mtss_train import seeds
from mtss_train.model import colorspace
from mtss_train.compat import slim, tf
from mtss_train.data.source import Source
from mtss_train.errors import DataError, MtssError
from mtss_train.task import Batch, Metric, Task, TaskConfig, register_task
from mtss_train.tasks import col_encoding as encoding

# mtss_train.tasks.col_prior, the prior's machinery, is imported where it is used: it imports
# this module, and `python -m mtss_train.tasks.col_prior` runs it as a program once the
# package has imported this one, which must not have imported it already (runpy warns).

# The pipeline's peak chroma is per CELL x CELL pixels: the finest output stride (8).
CELL = 8
# The pipeline keeps the ab of every SAMPLE-th pixel (rows and columns 0, 4, 8, ...): the
# centre pixel of a cell of any output stride (8i + 4, 16i + 8, 32i + 16) is among them.
SAMPLE = 4
# Images drawn from a source to check that it holds colour photos.
PROBE_IMAGES = 32
# `col.prior` values that are not files (`col_prior.load_prior` reads the files).
DATA_PRIOR = "data"
UNIFORM_PRIOR = "uniform"


def peak_chroma(ab: tf.Tensor, cell: int) -> tf.Tensor:
    """The largest sqrt(a^2 + b^2) [H/cell, W/cell] float32 of each `cell` x `cell` block of
    ab [H, W, 2]; H and W multiples of `cell`."""
    chroma = tf.norm(ab, axis=-1, keepdims=True)[None]
    return tf.nn.max_pool2d(chroma, cell, cell, "VALID")[0, ..., 0]


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
        prior: str = DATA_PRIOR  # "data" (the training data's own), "uniform", or a .npy file from col_prior.
        prior_images: int = 5000  # Images read, at most, to compute the "data" prior.
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
            if self.prior_images < 1:
                raise MtssError(f"col.prior_images must be >= 1, got {self.prior_images}")

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.prior: np.ndarray | None = None
        self.class_weights: np.ndarray | None = None
        # A file is read now, so a bad path fails before any data is read; the data's own
        # prior needs the opened source (`check_source`).
        if config.prior != DATA_PRIOR:
            from mtss_train.tasks.col_prior import load_prior

            self.use_prior(load_prior(config.prior))

    def use_prior(self, prior: np.ndarray) -> None:
        """Rebalances by `prior` [313] (normalised bin weights)."""
        self.prior = prior
        self.class_weights = encoding.rebalancing_weights(prior, self.config.rebalance)

    # -- data ---------------------------------------------------------------------------
    def check_source(self, source: Source, path: str | None) -> None:
        """The photos must include colour ones (see `check_colour`). With col.prior=data the
        first source checked sets the prior (`data_prior`): the trainer checks the training
        sources before the held-out ones (--eval_data), whose prior must not replace it.
        Under --strategy parameter_server the coordinator checks, and its traced steps carry
        the class weights to the workers."""
        self.check_colour(source.dataset(seed=0), source.path)
        if self.prior is None:
            from mtss_train.tasks.col_prior import data_prior, prior_cache_dir

            self.use_prior(data_prior(source, self.config, prior_cache_dir()))

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
        return seeds.map_with_seeds(images, self.make_example, seed)

    def make_example(self, image: tf.Tensor, seed: tf.Tensor) -> Batch:
        """One example from an RGB image, all randomness drawn from `seed` ([2] int).

        Returns:
          'image': [C, C, 3] uint8 RGB crop (C = crop; the short side scaled to
          resize_side first, randomly flipped); 'ab': [C/4, C/4, 2] float32 ab of every
          SAMPLE-th pixel; 'chroma': [C/8, C/8] float32 peak chroma per 8 px cell;
          'colour_fraction': [] float32, the share of cells with chroma >= min_chroma.
        """
        c = self.config
        place_seed, flip_seed = seeds.split(seed, 2)
        short_side = tf.reduce_min(tf.shape(image)[:2])
        # The crop's footprint in the image: C pixels of the resized image.
        side = tf.cast(tf.round(c.crop / c.resize_side * tf.cast(short_side, tf.float32)), tf.int32)
        side = tf.clip_by_value(side, 1, short_side)
        window = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), place_seed)
        crop = tf.image.resize(tf.cast(window, tf.float32), [c.crop, c.crop], antialias=True)
        crop = tf.cast(tf.round(tf.clip_by_value(crop, 0.0, 255.0)), tf.uint8)
        crop = tf.image.stateless_random_flip_left_right(crop, flip_seed)
        ab = colorspace.rgb_to_lab(crop)[..., 1:]
        chroma = peak_chroma(ab, CELL)
        fraction = tf.reduce_mean(tf.cast(chroma >= c.min_chroma, tf.float32))
        return {"image": crop, "ab": ab[::SAMPLE, ::SAMPLE], "chroma": chroma, "colour_fraction": fraction}

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
        """(ab [N, h, w, 2] of each cell's centre pixel, colour mask [N, h, w] float32 0/1) on
        the head's grid."""
        samples, cells = batch["ab"].shape[1:3], batch["chroma"].shape[1:3]
        step, factor = samples[0] // grid[0], cells[0] // grid[0]
        if factor < 1 or factor * grid[0] != cells[0] or factor * grid[1] != cells[1]:
            raise MtssError(f"col: head grid {grid} does not divide the {cells} target cells")
        # Samples 0, 4, 8, ... px: sample step * i + step / 2 is pixel (cell side) * i + side / 2.
        ab = batch["ab"][:, step // 2::step, step // 2::step]
        chroma = tf.nn.max_pool2d(batch["chroma"][..., None], factor, factor, "VALID")[..., 0]
        return ab, tf.cast(chroma >= self.config.min_chroma, tf.float32)

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, Metric]]:
        if self.class_weights is None:
            raise MtssError("col: the loss needs the ab prior of the training data, which check_source computes "
                            "from the opened source; call it first, or give col.prior=PATH or col.prior=uniform")
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
