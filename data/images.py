"""Images from a directory tree or TFRecords, decoded in tf.data; bad files are skipped.

Reading and decoding use OpenCV inside `tf.numpy_function` (it releases the GIL, so
parallel map scales) because a corrupt or vanished file must be skipped and counted, not
abort the pipeline, which TF's read/decode ops can only do by dropping errors silently.
"""

import hashlib
import os

import cv2
import numpy as np

from mtss_train.compat import tf
from mtss_train.data import sample
from mtss_train.data.files import is_tfrecord, walk_files
from mtss_train.data.source import SkipCounter
from mtss_train.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The feature key of encoded images in TFRecords (as written by tensorflow/models slim).
TFRECORD_IMAGE_KEY = "image/encoded"


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


def decode_rgb(encoded: bytes, min_side: int) -> np.ndarray | None:
    """Encoded image -> RGB uint8 [H, W, 3], or None if unreadable or a side < min_side."""
    try:
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # Raised for some malformed input (e.g. empty) instead of None.
        return None
    if image is None or min(image.shape[:2]) < min_side:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_file(path: bytes) -> bytes:
    """The file's bytes, or b'' if it cannot be read (e.g. deleted during the run)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


class ImageSource:
    """Endless shuffled RGB images from image files or TFRecords, skipping bad ones.

    Args:
      kind: 'files' or 'tfrecords' (see `find_sources`).
      paths: the files.
      where: what to name in messages (the directory the user gave).
      min_side: images with a smaller side are skipped and counted.
    """

    def __init__(self, kind: str, paths: list[str], where: str, min_side: int = 32):
        self.kind, self.paths, self.path = kind, paths, where
        self.min_side = min_side
        self.skipped = SkipCounter()
        self._check_some_image_decodes()

    def _check_some_image_decodes(self) -> None:
        # Fails fast instead of letting an all-bad source stall the endless pipeline.
        for data in self._records().as_numpy_iterator():
            if decode_rgb(read_file(data) if self.kind == "files" else data, self.min_side) is not None:
                return
        raise DataError(
            f"none of the images in the {len(self.paths)} {'image' if self.kind == 'files' else 'TFRecord'} "
            f"file(s) in {self.path} could be decoded with both sides >= {self.min_side} px"
        )

    def _decode(self, data: bytes) -> np.ndarray:
        """`data` is a file path (kind 'files') or encoded bytes (TFRecords)."""
        image = decode_rgb(read_file(data) if self.kind == "files" else data, self.min_side)
        if image is None:
            self.skipped.add(data.decode() if self.kind == "files" else hashlib.sha1(data).hexdigest())
            return np.zeros([0, 0, 3], np.uint8)
        return image

    def _records(self, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Paths (kind 'files') or encoded images (TFRecords) of this shard's files."""
        paths = tf.data.Dataset.from_tensor_slices(self.paths)
        if shard[0] > 1:
            paths = paths.shard(*shard)
        if self.kind == "files":
            return paths
        feature = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
        # A truncated file or a record without the image key is dropped (with a logged
        # warning), not counted: tf.data cannot say which record failed.
        return tf.data.TFRecordDataset(paths).map(
            lambda record: tf.io.parse_single_example(record, feature)[TFRECORD_IMAGE_KEY],
            num_parallel_calls=tf.data.AUTOTUNE,
        ).ignore_errors(log_warning=True)

    def dataset(self, seed: int, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Endless dataset of uint8 [H, W, 3]; `shard` = (num_shards, index) per input pipeline."""
        num_shards, index = shard
        if num_shards > len(self.paths):  # Too few files to split: all read all, own order.
            seed, shard = seed + index, (1, 0)
        records = self._records(shard).shuffle(min(len(self.paths), 10_000) if self.kind == "files" else 1_000,
                                  seed=seed, reshuffle_each_iteration=True).repeat()
        images = records.map(
            lambda data: tf.ensure_shape(
                tf.numpy_function(self._decode, [data], tf.uint8, stateful=False), [None, None, 3]
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return images.filter(lambda image: tf.size(image) > 0)


def image_source(path: str | None, min_side: int) -> ImageSource:
    """Images under `path`, or the embedded sample photos when `path` is None."""
    if path is None:
        return ImageSource("files", sample.sample_photo_paths(), "the embedded sample photos", min_side)
    return ImageSource(*find_sources(path), path, min_side)
