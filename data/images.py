"""Images from a directory tree or TFRecords, decoded in tf.data; bad inputs are skipped.

Reading, checking and decoding are TF ops (see `mtss_train.data.in_graph`), one pipeline in
every strategy: the parameter-server workers that build it themselves run what this process
runs. A corrupt or vanished file is skipped, not fatal, and each skipped input is counted
once and named once in the log with the reason (unreadable, truncated, too small, too many
pixels, ...), wherever it was read. Sizes are read from the headers first, so an image over
the pixel limit costs no memory. EXIF orientation is ignored, as in tensorflow/models slim.

Python code outside the pipeline (evaluation, BN recalibration, `prepare`, a plugin's own
source) reads images with `read_file` and `decode_rgb`, which give the pipeline's pixels.
"""

import dataclasses
import os

import cv2
import numpy as np

from mtss_train.compat import tf
from mtss_train.data import image_headers, in_graph, sample
from mtss_train.data.files import is_tfrecord, walk_files
from mtss_train.data.source import SkipCounter
from mtss_train.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The feature key of encoded images in TFRecords (as written by tensorflow/models slim).
TFRECORD_IMAGE_KEY = "image/encoded"
# Decoded images above this many pixels are skipped: a 12000x12000 photo alone takes
# ~5 GB through decoding and resizing. Ten times a 24-megapixel camera's photos.
DEFAULT_MAX_PIXELS = 50_000_000
# Inputs the start-up check reads at most before it calls a source unusable.
CHECK_LIMIT = 200
# Why a record gave no encoded image; said more exactly when reported (see `_unparsed`).
_NOT_AN_EXAMPLE = "not a tf.train.Example"


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How photos are read: the TFRecord feature holding them, and the pixel limit."""

    image_key: str = TFRECORD_IMAGE_KEY
    max_pixels: int = DEFAULT_MAX_PIXELS


def find_sources(path: str) -> tuple[str, list[str]]:
    """('files', image paths) or ('tfrecords', record paths) under `path`.

    Raises:
      DataError: if `path` does not exist or holds no images.
    """
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist")
    if os.path.isfile(path):
        kind = "files" if path.lower().endswith(IMAGE_EXTENSIONS) else "tfrecords"
        return kind, [path]
    files = walk_files(path)
    records = sorted(p for p in files if is_tfrecord(p))
    if records:
        return "tfrecords", records
    files = sorted(p for p in files if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) or TFRecords under {path}"
        )
    return "files", files


def explain(reason: str, evidence: bytes) -> str:
    """A skip reason of the TF pipeline, said exactly where only Python can: why a file
    could not be read (`evidence`: its path), what is wrong with an image that did not
    decode (`evidence`: its bytes)."""
    if reason == in_graph.UNREADABLE:
        try:
            open(evidence, "rb").close()
        except OSError as e:
            return f"{reason} ({e.strerror or type(e).__name__})"
    elif reason == in_graph.UNDECODABLE:
        return "empty" if not evidence else image_headers.png_problem(evidence) or reason
    return reason


def file_sizes(paths: list[str]) -> list[int]:
    """Each file's size in bytes; 1 for one that cannot be asked now, so reading it finds why."""
    sizes = []
    for path in paths:
        try:
            sizes.append(os.path.getsize(path))
        except OSError:
            sizes.append(1)
    return sizes


def decode_rgb(encoded: bytes, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """Encoded image -> RGB uint8 [H, W, 3], or None if unusable (empty, damaged, a side
    under `min_side`, over `max_pixels` by its header): for Python code outside the input
    pipeline (evaluation, BN recalibration, `prepare`, a plugin's own source).

    OpenCV, not the pipeline's TF ops: TF ops run inside a tf.numpy_function hang a
    parameter-server coordinator, where a plugin source's Python runs. The pixels are the
    pipeline's: accurate JPEG DCT, EXIF orientation ignored (tests/test_images.py compares).
    """
    if not encoded or image_headers.png_problem(encoded):
        return None
    size = image_headers.image_size(encoded)
    if size and not _fits(*size, min_side, max_pixels):
        return None
    try:
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:  # Raised for some malformed input instead of None.
        return None
    if image is None or not _fits(*image.shape[:2], min_side, max_pixels):
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _fits(height: int, width: int, min_side: int, max_pixels: int) -> bool:
    return min(height, width) >= min_side and height * width <= max_pixels


def read_file(path: bytes | str) -> bytes:
    """The file's bytes, or b'' if it cannot be read (e.g. deleted during the run)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _category(reason: str) -> str:
    return reason.split(" (", 1)[0]


class ImageSource:
    """Endless shuffled RGB images from image files or TFRecords, skipping bad ones.

    Args:
      kind: 'files' or 'tfrecords' (see `find_sources`).
      paths: the files.
      where: what to name in messages (the directory the user gave).
      min_side: images with a smaller side are skipped and counted.
      options: TFRecord image key and pixel limit.

    Raises:
      DataError: if none of the first CHECK_LIMIT inputs gives a usable image.
    """

    builds_remotely = True

    def __init__(self, kind: str, paths: list[str], where: str, min_side: int = 32,
                 options: ReadOptions = ReadOptions()):
        self.kind, self.paths, self.path = kind, paths, where
        self.min_side = min_side
        self.options = options
        self.skipped = SkipCounter()
        self._sizes = file_sizes(paths) if kind == "tfrecords" else []
        self._features_seen: list[str] = []  # Of a record without the image key, for messages.
        self._check_some_image_decodes()

    def dataset(self, seed: int | tf.Tensor, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Endless dataset of uint8 [H, W, 3]; `shard` = (num_shards, index) per input pipeline.

        Shards split the files round-robin in sorted order; with more shards than files, all
        read all, in their own order. `seed` may be a scalar int64 tensor.
        """
        num_shards, index = shard
        if num_shards > len(self.paths):
            seed, num_shards, index = seed + index, 1, 0
        mine = slice(index, None, num_shards)
        report = self.skipped.reporter(self._explain)
        if self.kind == "files":
            inputs = in_graph.endless_permutations((self.paths[mine],), seed)
        else:
            inputs = in_graph.endless_records(self.paths[mine], self._sizes[mine], seed, report)
        return self._images(inputs, report)

    def _images(self, inputs: tf.data.Dataset, report: in_graph.Report, chunk: int = in_graph.CHUNK) -> tf.data.Dataset:
        """The usable images of `inputs` (paths, or (key, record) of TFRecords)."""
        if self.kind == "files":
            examine, diagnose = self._examine_file, self._diagnose_file
        else:
            examine, diagnose = self._examine_record, self._diagnose_record
        return in_graph.decoded(inputs, examine, diagnose, in_graph.empty_image, report, chunk)

    def _check_some_image_decodes(self) -> None:
        # Fails fast instead of letting an all-bad source stall the endless pipeline: the
        # pipeline's own reading and decoding, over the first inputs in order, one at a time.
        # The bad inputs met here are named by the pipeline when it meets them, or in the error.
        problems: dict[str, list[tuple[str, str]]] = {}

        def note(key: bytes, reason: bytes, evidence: bytes) -> None:
            explained = self._explain(reason.decode(errors="replace"), evidence)
            problems.setdefault(_category(explained), []).append((key.decode(errors="replace"), explained))

        if self.kind == "files":
            inputs = tf.data.Dataset.from_tensor_slices(self.paths[:CHECK_LIMIT])
        else:
            files = tf.data.Dataset.from_tensor_slices((self.paths, self._sizes))
            inputs = in_graph.numbered_records(files, note).take(CHECK_LIMIT)
        for _ in self._images(inputs, note, chunk=1).take(1):
            return
        self._raise_unusable(problems, sum(len(items) for items in problems.values()))

    def _raise_unusable(self, problems: dict[str, list[tuple[str, str]]], examined: int) -> None:
        wanted = f"no '{self.options.image_key}' feature"
        if self.kind == "tfrecords" and list(problems) == [wanted]:
            raise DataError(
                f"the TFRecords in {self.path} have {wanted}, which should hold the encoded image; their "
                f"records have: {', '.join(self._features_seen) or 'no features'} (pick one with --image_key)"
            )
        what = "image" if self.kind == "files" else "TFRecord"
        first = f" (the first {examined} inputs)" if examined >= CHECK_LIMIT else ""
        found = "; ".join(f"{len(items)} {category}, e.g. {items[0][0]}{items[0][1][len(category):]}"
                          for category, items in problems.items()) or "they hold no records"
        raise DataError(
            f"none of the images in the {len(self.paths)} {what} file(s) in {self.path}{first} could be used "
            f"(both sides >= {self.min_side} px, at most {self.options.max_pixels / 1e6:g}M pixels): {found}"
        )

    def _examine_file(self, path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image, reason = in_graph.decode_rgb(tf.io.read_file(path), self.min_side, self.options.max_pixels)
        return path, image, reason

    def _diagnose_file(self, path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        data, read = in_graph.attempt(tf.io.read_file, path)
        return path, tf.where(read, in_graph.UNDECODABLE, in_graph.UNREADABLE), tf.where(read, data, path)

    def _encoded(self, record: tf.Tensor) -> tf.Tensor:
        """The record's encoded image; raises if it is no Example with bytes under the image key."""
        feature = {self.options.image_key: tf.io.FixedLenFeature([], tf.string)}
        return tf.io.parse_single_example(record, feature)[self.options.image_key]

    def _examine_record(self, key: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image, reason = in_graph.decode_rgb(self._encoded(record), self.min_side, self.options.max_pixels)
        return key, image, reason

    def _diagnose_record(self, key: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        encoded, parsed = in_graph.attempt(self._encoded, record)
        return key, tf.where(parsed, in_graph.UNDECODABLE, _NOT_AN_EXAMPLE), tf.where(parsed, encoded, record)

    def _explain(self, reason: str, evidence: bytes) -> str:
        return self._unparsed(evidence) if reason == _NOT_AN_EXAMPLE else explain(reason, evidence)

    def _unparsed(self, record: bytes) -> str:
        """Why a record gave no encoded image: it is no Example, or it lacks the image key
        (then the features it has are named, and kept for the start-up error)."""
        try:
            features = tf.train.Example.FromString(record).features.feature
        except Exception:  # noqa: BLE001  protobuf's DecodeError, whose module varies by version.
            return _NOT_AN_EXAMPLE
        self._features_seen = self._features_seen or sorted(features)
        return f"no '{self.options.image_key}' feature (the record has: {', '.join(sorted(features)) or 'none'})"


def image_source(path: str | None, min_side: int, options: ReadOptions = ReadOptions()) -> ImageSource:
    """Images under `path`, or the embedded sample photos when `path` is None."""
    if path is None:
        return ImageSource("files", sample.sample_photo_paths(), "the embedded sample photos", min_side, options)
    return ImageSource(*find_sources(path), path, min_side, options)
