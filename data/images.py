"""Images from a directory tree or TFRecords, decoded in tf.data; bad inputs are skipped.

Reading and decoding use OpenCV inside `tf.numpy_function` (it releases the GIL, so
parallel map scales) because a corrupt or vanished file must be skipped and counted, not
abort the pipeline, and a count kept in Python is one the progress line can show. Every
skipped input is counted once and named once in the log with the reason (unreadable,
truncated, too small, too many pixels, ...). Headers are read before decoding, so an image
over the pixel limit costs no memory and a truncated PNG never reaches libpng.

`dataset(..., pure_tf=True)` builds the same images from TF ops only, for parameter-server
workers, which cannot call back into this process (see `mtss_train.data.in_graph`): bad
inputs are skipped and named there too, but counted only in the log of the worker.
"""

import contextlib
import dataclasses
import os
from typing import Iterator

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
# Bytes a TFRecord adds around each record: length (8), its CRC (4), the data's CRC (4).
_RECORD_OVERHEAD = 16
_EMPTY = np.zeros([0, 0, 3], np.uint8)
# Inputs the start-up check reads at most before it calls a source unusable.
CHECK_LIMIT = 200


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How photos are read: the TFRecord feature holding them, and the pixel limit."""

    image_key: str = TFRECORD_IMAGE_KEY
    max_pixels: int = DEFAULT_MAX_PIXELS


_default_options = ReadOptions()


@contextlib.contextmanager
def read_options(options: ReadOptions) -> Iterator[None]:
    """Within the block, sources opened without explicit options use `options`."""
    global _default_options
    previous, _default_options = _default_options, options
    try:
        yield
    finally:
        _default_options = previous


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


def _size_problem(height: int, width: int, min_side: int, max_pixels: int) -> str:
    if height * width > max_pixels:
        return (f"too many pixels ({width}x{height} = {height * width / 1e6:.1f}M, over the limit of "
                f"{max_pixels / 1e6:g}M, --max_image_pixels)")
    if min(height, width) < min_side:
        return f"too small ({width}x{height} px, both sides must be >= {min_side})"
    return ""


def decode_image(encoded: bytes, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str]:
    """Encoded image -> (RGB uint8 [H, W, 3], '') or (None, why it was not usable).

    PNG and JPEG headers are checked (structure, size) before anything is decoded.
    """
    if not encoded:
        return None, "empty"
    problem = image_headers.png_problem(encoded)
    if problem:
        return None, problem
    size = image_headers.image_size(encoded)
    if size and _size_problem(*size, min_side, max_pixels):
        return None, _size_problem(*size, min_side, max_pixels)
    try:
        # EXIF orientation ignored, as tf.io decoding (parameter-server workers) and
        # tensorflow/models slim pipelines do: every pipeline sees the same pixels.
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:  # Raised for some malformed input instead of None.
        image = None
    if image is None:
        return None, "not a decodable image"
    problem = _size_problem(*image.shape[:2], min_side, max_pixels)  # Formats without a header read.
    return (None, problem) if problem else (cv2.cvtColor(image, cv2.COLOR_BGR2RGB), "")


def decode_rgb(encoded: bytes, min_side: int) -> np.ndarray | None:
    """Encoded image -> RGB uint8 [H, W, 3], or None if unusable (see `decode_image`)."""
    return decode_image(encoded, min_side)[0]


def read_bytes(path: bytes | str) -> tuple[bytes, str]:
    """(the file's bytes, '') or (b'', why it could not be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(), ""
    except OSError as e:
        return b"", f"could not be read ({e.strerror or type(e).__name__})"


def read_file(path: bytes | str) -> bytes:
    """The file's bytes, or b'' if it cannot be read (e.g. deleted during the run)."""
    return read_bytes(path)[0]


def _unread_rest(path: str, records: int, consumed: int) -> str:
    """Why a TFRecord file was not read to its end ('' if it was)."""
    try:
        size = os.path.getsize(path)
        if consumed >= size:
            return ""
        if consumed == 0:
            open(path, "rb").close()  # Unreadable (e.g. permissions) rather than damaged?
    except OSError as e:
        return f"could not be read ({e.strerror or type(e).__name__})"
    return f"truncated or corrupt TFRecord file (read {records} records, {consumed} of its {size} bytes; the rest is lost)"


def _category(reason: str) -> str:
    return reason.split(" (", 1)[0]


class ImageSource:
    """Endless shuffled RGB images from image files or TFRecords, skipping bad ones.

    Args:
      kind: 'files' or 'tfrecords' (see `find_sources`).
      paths: the files.
      where: what to name in messages (the directory the user gave).
      min_side: images with a smaller side are skipped and counted.
      options: TFRecord image key and pixel limit; default: those of `read_options`.
    """

    def __init__(self, kind: str, paths: list[str], where: str, min_side: int = 32,
                 options: ReadOptions | None = None):
        self.kind, self.paths, self.path = kind, paths, where
        self.min_side = min_side
        self.options = options or _default_options
        self.skipped = SkipCounter()
        self._features_seen: list[str] = []  # Of a record without the image key, for messages.
        self._check_some_image_decodes()

    def _check_some_image_decodes(self) -> None:
        # Fails fast instead of letting an all-bad source stall the endless pipeline. The
        # bad inputs met here are named by the pipeline when it meets them, or in the error.
        problems: dict[str, list[tuple[str, str]]] = {}
        examined = 0
        for element in self._records().as_numpy_iterator():
            image, key, reason = self._examine(*(element if isinstance(element, tuple) else (element,)))
            if image is not None:
                return
            if reason:
                problems.setdefault(_category(reason), []).append((key, reason))
                examined += 1
                if examined == CHECK_LIMIT:
                    break
        self._raise_unusable(problems, examined)

    def _raise_unusable(self, problems: dict[str, list[tuple[str, str]]], examined: int) -> None:
        wanted = f"no '{self.options.image_key}' feature"
        if self.kind == "tfrecords" and list(problems) == [wanted]:
            raise DataError(
                f"the TFRecords in {self.path} have {wanted}, which should hold the encoded image; their "
                f"records have: {', '.join(self._features_seen) or 'no features'} (pick one with --image_key)"
            )
        what = "image" if self.kind == "files" else "TFRecord"
        first = f" (the first {examined} inputs)" if examined == CHECK_LIMIT else ""
        found = "; ".join(f"{len(items)} {category}, e.g. {items[0][0]}{items[0][1][len(category):]}"
                          for category, items in problems.items()) or "they hold no records"
        raise DataError(
            f"none of the images in the {len(self.paths)} {what} file(s) in {self.path}{first} could be used "
            f"(both sides >= {self.min_side} px, at most {self.options.max_pixels / 1e6:g}M pixels): {found}"
        )

    def _examine_file(self, path: bytes) -> tuple[np.ndarray | None, str, str]:
        """(image or None, key, reason) of an image file; reason '' if already skipped."""
        key = path.decode()
        if key in self.skipped:
            return None, key, ""  # Known bad: not read (and its decoder noise not printed) again.
        data, reason = read_bytes(path)
        if reason:
            return None, key, reason
        image, reason = decode_image(data, self.min_side, self.options.max_pixels)
        return image, key, reason

    def _examine(self, *element) -> tuple[np.ndarray | None, str, str]:
        """(image or None, key, reason) of a dataset element (see `_records`)."""
        return self._examine_record(*element) if self.kind == "tfrecords" else self._examine_file(*element)

    def _examine_record(self, file: bytes, index: int, record: bytes, consumed: int) -> tuple[np.ndarray | None, str, str]:
        """(image or None, key, reason) of a TFRecord record, or of a file's end marker
        (index -1 - records read), which checks the file was read to its end."""
        file = file.decode()
        if index < 0:
            return None, file, _unread_rest(file, -index - 1, consumed)
        key = f"{file} (record {index})"
        if key in self.skipped:
            return None, key, ""
        try:
            example = tf.train.Example.FromString(record)
        except Exception:  # noqa: BLE001  protobuf's DecodeError, whose module varies by version.
            return None, key, "not a tf.train.Example"
        features = example.features.feature
        image_key = self.options.image_key
        if image_key not in features or not features[image_key].bytes_list.value:
            self._features_seen = self._features_seen or sorted(features)
            return None, key, f"no '{image_key}' feature (the record has: {', '.join(sorted(features)) or 'none'})"
        image, reason = decode_image(features[image_key].bytes_list.value[0], self.min_side, self.options.max_pixels)
        return image, key, reason

    def _decode(self, *element) -> np.ndarray:
        """tf.numpy_function body: the image, or an empty one (counted) if unusable."""
        image, key, reason = self._examine(*element)
        if image is None:
            if reason:
                self.skipped.add(key, reason)
            return _EMPTY
        return image

    def _file_records(self, path: tf.Tensor) -> tf.data.Dataset:
        """(path, index, record, bytes read so far) of one TFRecord file, then an end marker
        (index -1 - records read) whose byte count tells whether the file was read whole."""
        # A truncated or corrupt record ends the file here; the end marker then reports it.
        records = tf.data.TFRecordDataset(path).ignore_errors()
        sized = records.map(lambda record: (record, tf.cast(tf.strings.length(record), tf.int64)))
        end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(-1, tf.int64)))

        def count(state: tuple[tf.Tensor, tf.Tensor], element: tuple[tf.Tensor, tf.Tensor]):
            index, consumed = state
            record, length = element
            is_end = length < 0
            consumed += tf.where(is_end, tf.constant(0, tf.int64), length + _RECORD_OVERHEAD)
            return (index + 1, consumed), (path, tf.where(is_end, -1 - index, index), record, consumed)

        return sized.concatenate(end).scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)

    def dataset(self, seed: int | tf.Tensor, shard: tuple[int, int] = (1, 0), pure_tf: bool = False) -> tf.data.Dataset:
        """Endless dataset of uint8 [H, W, 3]; `shard` = (num_shards, index) per input pipeline.

        `pure_tf`: read and decode with TF ops only (see `mtss_train.data.in_graph`), for
        pipelines that run on remote workers; `seed` may then be a tensor, and bad inputs
        are named in the log where they are read.
        """
        num_shards, index = shard
        if num_shards > len(self.paths):  # Too few files to split: all read all, own order.
            seed, shard = seed + index, (1, 0)
        if pure_tf:
            return self._decoded_in_tf(self._records_in_tf(shard, seed))
        records = self._records(shard).shuffle(min(len(self.paths), 10_000) if self.kind == "files" else 1_000,
                                               seed=seed, reshuffle_each_iteration=True).repeat()
        images = records.map(
            lambda *element: tf.ensure_shape(
                tf.numpy_function(self._decode, list(element), tf.uint8, stateful=False), [None, None, 3]
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return images.filter(lambda image: tf.size(image) > 0)

    def _records(self, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Paths (kind 'files') or (file, index, record, bytes read) of this shard's TFRecords."""
        paths = tf.data.Dataset.from_tensor_slices(self.paths)
        if shard[0] > 1:
            paths = paths.shard(*shard)
        return paths if self.kind == "files" else paths.flat_map(self._file_records)

    def _records_in_tf(self, shard: tuple[int, int], seed: int | tf.Tensor) -> tf.data.Dataset:
        """Endless shuffled paths (kind 'files') or ('file (record index)', record) of this
        shard, in TF ops only."""
        paths = in_graph.endless_permutations((self.paths[shard[1]::shard[0]],), seed)
        return paths if self.kind == "files" else in_graph.numbered_records(paths)

    def _decoded_in_tf(self, records: tf.data.Dataset) -> tf.data.Dataset:
        """Images of `_records_in_tf`, skipping bad ones, in TF ops only."""
        if self.kind == "files":
            encoded = in_graph.interleave_attempts(records.map(lambda path: (path, path)), in_graph.read, in_graph.unread)
        else:
            image_key = self.options.image_key
            feature = {image_key: tf.io.FixedLenFeature([], tf.string)}
            encoded = in_graph.interleave_attempts(
                records,
                lambda key, record: (key, tf.io.parse_single_example(record, feature)[image_key], tf.constant("")),
                lambda key, record: (key, tf.constant(""), tf.constant(f"not a tf.train.Example with an '{image_key}' feature")),
            )
        min_side, max_pixels = self.min_side, self.options.max_pixels
        images = in_graph.interleave_attempts(
            encoded,
            lambda key, data, reason: (key, *in_graph.decode_rgb(data, reason, min_side, max_pixels)),
            lambda key, data, reason: (key, in_graph.empty_image(), tf.constant(in_graph.UNDECODABLE)),
        )
        return in_graph.drop_skipped(images).map(lambda image: tf.ensure_shape(image, [None, None, 3]))


def image_source(path: str | None, min_side: int, options: ReadOptions | None = None) -> ImageSource:
    """Images under `path`, or the embedded sample photos when `path` is None."""
    if path is None:
        return ImageSource("files", sample.sample_photo_paths(), "the embedded sample photos", min_side, options)
    return ImageSource(*find_sources(path), path, min_side, options)
