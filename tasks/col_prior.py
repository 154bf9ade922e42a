"""Computes the empirical ab prior of a data set, for colorization's class rebalancing.

    python -m mtss_train.tasks.col_prior --data DIR --out DIR_prior.npy [--images N]
    python -m mtss_train --tasks col --data DIR --task_param col.prior=DIR_prior.npy

The prior is the histogram over the 313 ab bins of the cells the col task trains on: each
image scaled to col's resize_side, cut into output-stride cells (16 px), each colour cell
counted at the nearest bin of its centre pixel's ab (col's target); grey cells and grey
photos count nothing. It is saved as a float64 .npy of 313 probabilities summing to 1.

col computes the same prior by itself at start (`col.prior=data`, the default) from up to
`col.prior_images` images of its training data, and caches it; this command is for a prior
of other data, of more images, or made ahead of time.

The col task imports this module for that (`load_prior`, `data_prior`); the command's flags
are defined only when it runs (`run`), so they never meet the trainer's own --data.
"""

import hashlib
import io
import json
import os
import pathlib

import numpy as np
from absl import app, flags, logging

from mtss_train.model import colorspace
from mtss_train.compat import tf
from mtss_train.data import clip
from mtss_train.data.files import write_atomically
from mtss_train.data.images import image_source
from mtss_train.data.source import Source
from mtss_train.errors import DataError, MtssError, cli_main
from mtss_train.progress import ProgressLine
from mtss_train.task import MIN_IMAGE_SIDE
from mtss_train.tasks import col_encoding as encoding
from mtss_train.tasks.col import DATA_PRIOR, UNIFORM_PRIOR, Colorization, peak_chroma

# Bump when the prior's computation changes, so old cache entries stop matching.
PRIOR_CACHE_VERSION = 1


def image_counts(image: tf.Tensor, side: int, cell: int, min_chroma: float) -> tf.Tensor:
    """Bin counts [313] float32 of one RGB uint8 image [H, W, 3]: its short side scaled to
    `side`, cut into `cell` px cells (the rest dropped), each colour cell (peak chroma >=
    `min_chroma`) counted at the nearest bin of its centre pixel's ab, as col's targets."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.cast(tf.round(shape * side / tf.reduce_min(shape)), tf.int32) // cell * cell
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.maximum(size, cell), antialias=True)
    ab = colorspace.rgb_to_lab(tf.clip_by_value(resized, 0.0, 255.0))[..., 1:]
    centres = ab[cell // 2::cell, cell // 2::cell]
    return encoding.bin_histogram(centres, peak_chroma(ab, cell) >= min_chroma)


def estimate_counts(images: tf.data.Dataset, count: int, config: Colorization.Config,
                    progress: ProgressLine | None = None) -> tuple[np.ndarray, int]:
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
            progress.advance()
    if progress:
        progress.finish()
    return total, read


def _write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically (`write_atomically`)."""
    write_atomically(path, lambda temporary: pathlib.Path(temporary).write_bytes(data))


def write_prior(prior: np.ndarray, path: str) -> None:
    """Saves a prior as .npy, atomically.

    Raises:
      MtssError: if the directory of `path` does not exist.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MtssError(f"--out: directory {directory} does not exist")
    buffer = io.BytesIO()
    np.save(buffer, prior)
    _write_bytes(path, buffer.getvalue())


def load_prior(spec: str) -> np.ndarray:
    """The ab prior [313] named by `col.prior`: "uniform" or a .npy file of bin weights
    (probabilities or counts).

    Raises:
      MtssError: if the file is missing or does not hold 313 non-negative numbers.
    """
    if spec == UNIFORM_PRIOR:
        return np.ones(encoding.NUM_BINS)
    hint = "compute one with: python -m mtss_train.tasks.col_prior --data DIR --out PATH"
    if not os.path.isfile(spec):
        raise MtssError(f"col.prior: no file {spec} ('{DATA_PRIOR}', '{UNIFORM_PRIOR}' or a .npy prior); {hint}")
    try:
        prior = np.load(spec, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MtssError(f"col.prior: {spec} is not a .npy array ({e}); {hint}") from None
    if prior.shape != (encoding.NUM_BINS,) or not np.all(np.isfinite(prior)) or prior.min() < 0 or prior.sum() <= 0:
        raise MtssError(f"col.prior: {spec} must hold {encoding.NUM_BINS} non-negative numbers with a positive "
                        f"sum, got shape {prior.shape}; {hint}")
    return prior / prior.sum()


def prior_cache_dir() -> str:
    """Where data priors are cached: col_prior/ under the project's cache ($MTSS_CACHE_DIR,
    else ~/.cache/mtss_train), beside the sample clip's masks."""
    return os.path.join(clip.cache_dir(), "col_prior")


def prior_cache_key(source: Source, config: Colorization.Config) -> str:
    """What identifies a data prior, cheaply: the source's files (path, size, modification
    time; TFRecord files likewise), how they are read, and the settings of the histogram.

    Raises:
      MtssError: if the source does not list its files (not an image source).
      DataError: if one of its files vanished.
    """
    paths = getattr(source, "paths", None)
    if paths is None:
        raise MtssError(f"col.prior={DATA_PRIOR} needs an image source that lists its files, not "
                        f"{type(source).__name__}; give col.prior=PATH (python -m mtss_train.tasks.col_prior)")
    files = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as e:
            raise DataError(f"col: cannot read {path} to compute the data's ab prior: {e.strerror}") from None
        files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    identity = {
        "version": PRIOR_CACHE_VERSION, "kind": source.kind, "files": files, "min_side": source.min_side,
        "image_key": source.options.image_key, "max_pixels": source.options.max_pixels,
        "images": config.prior_images, "resize_side": config.resize_side, "cell": config.output_stride,
        "min_chroma": config.min_chroma, "sample": "centre",
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _read_cached(path: str) -> tuple[np.ndarray, dict] | None:
    """(counts, what they were computed from) of a cache entry; None if absent or unusable."""
    if not os.path.isfile(path):
        return None
    try:
        counts = np.load(path, allow_pickle=False)
        with open(path[:-len(".npy")] + ".json") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        logging.warning("col: ignoring unreadable prior cache %s: %s", path, e)
        return None
    return (counts, meta) if counts.shape == (encoding.NUM_BINS,) and counts.sum() > 0 else None


def data_prior(source: Source, config: Colorization.Config, cache_dir: str) -> np.ndarray:
    """The ab prior [313] of `source`'s images: bin counts of their colour cells (see
    `image_counts`) over the first `config.prior_images` images in the source's seed-0 order
    (every image once if the source has fewer files; TFRecords are read on, from the start
    again if they hold fewer), read from `cache_dir` if computed before.

    Every process that starts on the same data computes the same counts (a fixed order),
    so two of them computing at once write the same entry; each write is atomic.

    Raises:
      DataError: if the images read have no colour cell.
    """
    path = os.path.join(cache_dir, f"{prior_cache_key(source, config)}.npy")
    cached = _read_cached(path)
    if cached:
        counts, meta = cached
        where = f"read from the cache {path}"
    else:
        count = min(config.prior_images, len(source.paths)) if source.kind == "files" else config.prior_images
        logging.info("col: computing the ab prior of %s for class rebalancing (%d images)", source.path, count)
        counts, read = estimate_counts(source.dataset(seed=0), count, config, ProgressLine("prior", count, "images"))
        if counts.sum() == 0:
            raise DataError(f"col: no colour cell in the {read} images read from {source.path} to compute its ab "
                            "prior; colorization needs colour photos")
        meta = {"data": source.path, "images": read}
        try:
            os.makedirs(cache_dir, exist_ok=True)
            # The entry counts once its .npy is there: its description is written first.
            _write_bytes(path[:-len(".npy")] + ".json", json.dumps(meta).encode())
            write_prior(counts, path)
            where = f"cached in {path}"
        except OSError as e:
            logging.warning("col: could not cache the ab prior in %s: %s (set $%s elsewhere)", cache_dir, e,
                            clip.CACHE_ENV)
            where = "not cached"
    logging.info("col: class rebalancing by the ab prior of %s: %d images read, %d colour cells, %d of %d bins "
                 "seen (%s)", meta["data"], meta["images"], int(counts.sum()), np.count_nonzero(counts),
                 encoding.NUM_BINS, where)
    return counts / counts.sum()


# -- the command ---------------------------------------------------------------------------

def define_flags() -> None:
    """The command's flags (call once, only when it runs: see the module docstring)."""
    flags.DEFINE_string("data", None, "Images: a directory (recursive jpg/png) or TFRecords.")
    flags.DEFINE_string("out", None, "Where to write the prior (.npy).")
    flags.DEFINE_integer("images", None, "Images to read (default: every image file once; "
                         "required for TFRecords).", lower_bound=1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {argv[1:]}; usage: python -m mtss_train.tasks.col_prior "
                        "--data DIR --out PATH [--images N]")
    values = flags.FLAGS
    if not values.data or not values.out:
        raise MtssError("--data and --out are required")
    source = image_source(values.data, MIN_IMAGE_SIDE)
    count = values.images or (len(source.paths) if source.kind == "files" else None)
    if count is None:
        raise MtssError(f"{values.data} holds TFRecords: give --images N (how many images to read)")
    # The cells the col task trains on with its default settings.
    counts, read = estimate_counts(source.dataset(seed=0), count, Colorization.Config(),
                                  ProgressLine("prior", count, "images"))
    if counts.sum() == 0:
        raise MtssError(f"no colour cell in the {read} images read from {values.data}: the prior needs colour photos")
    write_prior(counts / counts.sum(), values.out)
    print(f"wrote {values.out}: ab prior over {encoding.NUM_BINS} bins from {read} images "
          f"({int(counts.sum())} colour cells, {np.count_nonzero(counts)} bins seen); "
          f"use --task_param col.prior={values.out}")


def run() -> None:
    define_flags()
    app.run(cli_main(main))


if __name__ == "__main__":
    run()
