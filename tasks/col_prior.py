"""Computes the empirical ab prior of a data set, for colorization's class rebalancing.

    python -m mtss_train.tasks.col_prior --data DIR --out DIR_prior.npy [--images N]
    python -m mtss_train --tasks col --data DIR --task_param col.prior=DIR_prior.npy

The prior is the histogram over the 313 ab bins of the cells the col task trains on: each
image scaled to col's resize_side, cut into output-stride cells (16 px), each colour cell
counted at its mean ab's nearest bin; grey cells and grey photos count nothing. It is saved
as a float64 .npy of 313 probabilities summing to 1.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

from mtss_train.data.images import image_source
from mtss_train.errors import MtssError, cli_main
from mtss_train.task import MIN_IMAGE_SIDE
from mtss_train.tasks import col_encoding as encoding
from mtss_train.tasks.col import Colorization, estimate_counts

_DATA = flags.DEFINE_string("data", None, "Images: a directory (recursive jpg/png) or TFRecords.")
_OUT = flags.DEFINE_string("out", None, "Where to write the prior (.npy).")
_IMAGES = flags.DEFINE_integer("images", None, "Images to read (default: every image file once; "
                               "required for TFRecords).", lower_bound=1)


class Progress:
    """A one-line progress report on stderr: images done, rate, ETA (at most twice a second)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.start = self.shown = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.shown < 0.5 and done < total:
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = int((total - done) / rate) if rate > 0 else 0
        self.stream.write(f"\rprior: {done}/{total} images, {rate:.1f} images/s, ETA {eta // 60}:{eta % 60:02d}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def write_prior(prior: np.ndarray, path: str) -> None:
    """Saves atomically (temporary file + rename), so a crash leaves no half-written prior."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MtssError(f"--out: directory {directory} does not exist")
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        np.save(f, prior)
    os.replace(temporary, path)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {argv[1:]}; usage: python -m mtss_train.tasks.col_prior "
                        "--data DIR --out PATH [--images N]")
    if not _DATA.value or not _OUT.value:
        raise MtssError("--data and --out are required")
    source = image_source(_DATA.value, MIN_IMAGE_SIDE)
    count = _IMAGES.value or (len(source.paths) if source.kind == "files" else None)
    if count is None:
        raise MtssError(f"{_DATA.value} holds TFRecords: give --images N (how many images to read)")
    # The cells the col task trains on with its default settings.
    counts, read = estimate_counts(source.dataset(seed=0), count, Colorization.Config(), Progress())
    if counts.sum() == 0:
        raise MtssError(f"no colour cell in the {read} images read from {_DATA.value}: the prior needs colour photos")
    write_prior(counts / counts.sum(), _OUT.value)
    print(f"wrote {_OUT.value}: ab prior over {encoding.NUM_BINS} bins from {read} images "
          f"({int(counts.sum())} colour cells, {np.count_nonzero(counts)} bins seen); "
          f"use --task_param col.prior={_OUT.value}")


def run() -> None:
    app.run(cli_main(main))


if __name__ == "__main__":
    run()
