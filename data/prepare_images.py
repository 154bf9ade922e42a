"""Image shards for the trainer, made by an Apache Beam pipeline (`prepare images`).

Per file, `prepare_image` (a pure function) reads it (tf.io.gfile), decodes it with OpenCV
as the trainer does, optionally shrinks it to at most `max_pixels` (aspect kept), checks
both sides are >= `min_side` and digests the decoded pixels. Files with identical pixels
are one image: their digest sends them to one shard, where only the smallest path is kept.

Output (the trainer reads it with `--data OUT`):
  OUT/images-SSSSS-of-NNNNN.tfrecord  tf.train.Examples in digest order: image/encoded (the
                                      file's own bytes if JPEG or PNG and not resized, else
                                      JPEG at `jpeg_quality`), image/format, image/height,
                                      image/width, image/filename (relative to the input root)
  OUT/manifest.json                   settings; listed/written/skipped counts; records per
                                      shard; the skipped files by reason
A shard is written by one worker, which holds its images in memory: pick --shards so a
shard is ~100-200 MB (ImageNet's 1.28M images: ~1024 shards).
"""

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import cv2
import numpy as np

from mtss_train.compat import tf
from mtss_train.data import beam_io
from mtss_train.data.beam_io import beam
from mtss_train.data.images import IMAGE_EXTENSIONS, decode_rgb
from mtss_train.errors import MtssError

PREFIX = "images"
UNREADABLE, UNDECODABLE, TOO_SMALL, DUPLICATE = "unreadable", "undecodable", "too_small", "duplicate"
SKIP_REASONS = (UNREADABLE, UNDECODABLE, TOO_SMALL, DUPLICATE)
_SKIPPED = "skipped"
_COUNTERS = "mtss_prepare_images"


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What decides the written images; stored in the manifest.

    Attributes:
      min_side: images with a side below this many px (after resizing) are skipped.
      max_pixels: larger images are shrunk (aspect kept, area interpolation) to at most this
        many pixels; None keeps every size.
      jpeg_quality: JPEG quality of re-encoded images (resized, or neither JPEG nor PNG).
    """

    min_side: int = 32
    max_pixels: int | None = None
    jpeg_quality: int = 95

    def validate(self) -> None:
        """Raises MtssError naming the first bad setting."""
        if self.min_side < 1:
            raise MtssError(f"image settings: min_side must be >= 1, not {self.min_side}")
        if self.max_pixels is not None and self.max_pixels < self.min_side ** 2:
            raise MtssError(f"image settings: max_pixels ({self.max_pixels}) must be >= min_side^2 "
                            f"({self.min_side ** 2}) or every image would be too small")
        if not 1 <= self.jpeg_quality <= 100:
            raise MtssError(f"image settings: jpeg_quality must be in [1, 100], not {self.jpeg_quality}")


class PreparedImage(NamedTuple):
    """One usable image on its way to a shard."""

    digest: str  # SHA-256 of the decoded pixels (and their shape), hex.
    path: str
    name: str  # The path relative to the input root; written as image/filename.
    encoded: bytes
    height: int
    width: int
    format: str  # 'jpeg' or 'png'.


def gfile_bytes(path: str) -> bytes | None:
    """The file's bytes (local or any tf.io.gfile filesystem), or None if it cannot be read."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.OpError, OSError):
        return None


def encoded_format(data: bytes) -> str | None:
    """'jpeg' or 'png' by the file's signature, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def cap_pixels(rgb: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """uint8 [H, W, 3] shrunk (aspect kept) to at most `max_pixels` pixels; itself if it fits."""
    height, width = rgb.shape[:2]
    if max_pixels is None or height * width <= max_pixels:
        return rgb
    scale = math.sqrt(max_pixels / (height * width))
    # Rounding down keeps the product under the cap.
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def prepare_image(path: str, name: str, settings: ImageSettings) -> PreparedImage | str:
    """The image at `path` ready for a shard, or the reason it is skipped (a SKIP_REASONS entry)."""
    data = gfile_bytes(path)
    if data is None:
        return UNREADABLE
    rgb = decode_rgb(data, 0)
    if rgb is None:
        return UNDECODABLE
    key = beam_io.digest(np.asarray(rgb.shape, np.int64).tobytes() + rgb.tobytes())
    image = cap_pixels(rgb, settings.max_pixels)
    if min(image.shape[:2]) < settings.min_side:
        return TOO_SMALL
    kind = encoded_format(data)
    if image is not rgb or kind is None:
        ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                  [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality])
        if not ok:
            return UNDECODABLE
        data, kind = buffer.tobytes(), "jpeg"
    return PreparedImage(key, path, name, data, image.shape[0], image.shape[1], kind)


def _prepare(path: str, root: str, settings: ImageSettings, shards: int) -> Iterator:
    """Beam step: (shard, PreparedImage), or (reason, path) on the skipped output."""
    result = prepare_image(path, os.path.relpath(path, root), settings)
    if isinstance(result, str):
        beam.metrics.Metrics.counter(_COUNTERS, f"skipped_{result}").inc()
        yield beam.pvalue.TaggedOutput(_SKIPPED, (result, path))
    else:
        yield beam_io.shard_of(result.digest, shards), result


def _example(image: PreparedImage) -> bytes:
    return beam_io.example({
        "image/encoded": image.encoded, "image/format": image.format, "image/height": image.height,
        "image/width": image.width, "image/filename": image.name,
    })


def _write(shard: tuple, run: str, shards: int) -> dict:
    """Beam step: writes shard (index, images) in digest order, the first path of each digest only."""
    index, images = shard
    kept, duplicates = [], []
    for image in sorted(images, key=lambda i: (i.digest, i.path)):
        if kept and kept[-1].digest == image.digest:
            duplicates.append({"path": image.path, "same_as": kept[-1].path})
        else:
            kept.append(image)
    beam.metrics.Metrics.counter(_COUNTERS, "written").inc(len(kept))
    stats = beam_io.write_shard(map(_example, kept), run, beam_io.shard_name(PREFIX, index, shards))
    return {**stats, "duplicates": duplicates}


def _commit(_, written: list[dict], skipped: list[tuple[str, str]], plan: beam_io.Plan) -> None:
    """Beam step (once, after every shard): moves the shards into place and writes the manifest."""
    files = {reason: sorted(path for why, path in skipped if why == reason) for reason in SKIP_REASONS}
    files[DUPLICATE] = sorted((d for shard in written for d in shard["duplicates"]), key=lambda d: d["path"])
    summary = {"listed": plan.listed, "written": sum(shard["records"] for shard in written),
               "skipped": {reason: len(files[reason]) for reason in SKIP_REASONS}}
    beam_io.commit(plan, PREFIX, written, {"summary": summary, "skipped": files})


def prepare_images(pattern: str, output: str, shards: int, settings: ImageSettings,
                   options: "beam.options.pipeline_options.PipelineOptions") -> dict:
    """Runs the images pipeline (see the module docstring) to the end; returns the manifest.

    Args:
      pattern: a glob, or a directory searched recursively for IMAGE_EXTENSIONS files.
      output: the output directory (local or any tf.io.gfile filesystem).
      shards: the number of TFRecord files.
      settings: decoding and resizing settings.
      options: Beam pipeline options (the runner and its settings).

    Raises:
      DataError: if `pattern` matches nothing.
      MtssError: if a setting is bad, or `output` cannot be written or holds other data.
    """
    settings.validate()
    plan = beam_io.make_plan("images", pattern, IMAGE_EXTENSIONS, output, shards, dataclasses.asdict(settings))
    return beam_io.run_pipeline(plan, options, _prepare, _write, _commit, _SKIPPED, settings)
