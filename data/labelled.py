"""Labelled images for evaluation: class folders, slim TFRecords, and idx (MNIST-style) files.

Three layouts, told apart by `open_labelled(path)`:

* class folders: `DIR/<class name>/**/*.{jpg,jpeg,png}`; labels are the indices of the
  sorted folder names (a test split is opened with the training split's classes, so the
  same name gets the same label).
* TFRecords (`*.tfrecord`, `*.tfrecords`, `*.tfrecord-*`, ...): tf.train.Example records
  with `image/encoded` (bytes) and `image/class/label` (int64), as tensorflow/models slim's
  dataset converters write them; labels are used as stored.
* idx files, as Fashion-MNIST ships them (Debian's dataset-fashion-mnist installs
  /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz): pass
  the images file, or its prefix (`.../fashion-mnist/train`), or a directory holding one pair.

Every image goes to the trunk as RGB uint8 [S, S, 3]: its shorter side resized to S
(bilinear when enlarging, area when shrinking), then centrally cropped; grey images get
three equal channels. Unreadable images are skipped and counted (`skipped`), like training
input. Usage:

    train = open_labelled("/usr/share/datasets/fashion-mnist/train")
    test = open_labelled("/usr/share/datasets/fashion-mnist/t10k", classes=train.classes)
    for images, labels in train.dataset(image_size=96, limit=10_000).batch(256): ...
"""

import gzip
import hashlib
import os

import cv2
import numpy as np

from mtss_train.compat import tf
from mtss_train.data.files import is_tfrecord, walk_files
from mtss_train.data.images import IMAGE_EXTENSIONS, TFRECORD_IMAGE_KEY, decode_rgb, read_file
from mtss_train.data.source import SkipCounter
from mtss_train.errors import DataError

TFRECORD_LABEL_KEY = "image/class/label"
IDX_IMAGES = "-images-idx3-ubyte"
IDX_LABELS = "-labels-idx1-ubyte"
# idx type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Class folders are listed in a fixed pseudo-random order, so `limit` takes every class.
_FOLDER_ORDER_SEED = 0


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size`, central crop: [H, W] or [H, W, 1|3] -> uint8 [size, size, 3]."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    method = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=method)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size]
    if crop.ndim == 2:  # Grey (cv2.resize also drops a trailing channel of 1).
        crop = np.repeat(crop[:, :, None], 3, axis=2)
    return np.ascontiguousarray(crop, dtype=np.uint8)


def _stat_digest(paths: list[str], extra: str = "") -> str:
    """Digest of file identities (path, size, mtime): cheap, and changes when a file does."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class LabelledData:
    """Labelled images in a fixed order.

    Attributes:
      kind: 'folders', 'tfrecords' or 'idx'.
      path: what messages name (the path the user gave).
      classes: class names (label i is classes[i]) for class folders; None when labels are
        stored numbers (TFRecords, idx).
      skipped: the images that could not be decoded so far.
    """

    kind = ""

    def __init__(self, path: str, classes: list[str] | None = None):
        self.path = path
        self.classes = classes
        self.skipped = SkipCounter()

    def count(self, limit: int | None = None) -> int | None:
        """How many examples `dataset(limit=limit)` reads, if known without reading them."""
        return limit

    def fingerprint(self) -> str:
        """Identifies the data (files and their versions, class mapping) for feature caches."""
        raise NotImplementedError

    def _examples(self) -> tf.data.Dataset:
        raise NotImplementedError

    def dataset(self, image_size: int, limit: int | None = None) -> tf.data.Dataset:
        """(image uint8 [image_size, image_size, 3], label int64 []) pairs, always in one order.

        `limit` keeps the first N examples (undecodable ones among them are skipped).
        """
        examples = self._examples()
        if limit is not None:
            examples = examples.take(limit)
        images = examples.map(
            lambda data, label: (
                tf.ensure_shape(tf.numpy_function(lambda d: self._load(d, image_size), [data], tf.uint8,
                                                  stateful=False), [None, None, 3]),
                label),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        images = images.filter(lambda image, label: tf.size(image) > 0)
        return images.map(lambda image, label: (tf.ensure_shape(image, [image_size, image_size, 3]), label))

    def _load(self, data: np.ndarray, size: int) -> np.ndarray:
        """One example's stored data -> uint8 [size, size, 3], or [0, 0, 3] if unreadable."""
        raise NotImplementedError


class ClassFolders(LabelledData):
    """`DIR/<class>/**/*.jpg|jpeg|png`; hidden folders are not classes."""

    kind = "folders"

    def __init__(self, path: str, classes: list[str] | None = None):
        found = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))
        if not found:
            raise DataError(f"{path} has no class folders: expected one subdirectory of images per class")
        if classes is not None:
            unknown = [n for n in found if n not in classes]
            if unknown:
                raise DataError(f"class folder(s) {', '.join(unknown[:5])} in {path} are not classes of the "
                                f"training data ({len(classes)} classes: {', '.join(classes[:5])}...)")
        super().__init__(path, list(classes if classes is not None else found))
        index = {name: i for i, name in enumerate(self.classes)}
        items = []
        for name in found:
            files = sorted(p for p in walk_files(os.path.join(path, name)) if p.lower().endswith(IMAGE_EXTENSIONS))
            items += [(p, index[name]) for p in files]
        if not items:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {path}")
        order = np.random.default_rng(_FOLDER_ORDER_SEED).permutation(len(items))
        self.files = [items[i][0] for i in order]
        self.labels = np.array([items[i][1] for i in order], np.int64)

    def count(self, limit: int | None = None) -> int:
        return len(self.files) if limit is None else min(limit, len(self.files))

    def fingerprint(self) -> str:
        return _stat_digest(self.files, "folders\0" + "\0".join(self.classes) + repr(self.labels.tolist()))

    def _examples(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((self.files, self.labels))

    def _load(self, data: bytes, size: int) -> np.ndarray:
        image = decode_rgb(read_file(data), 1)
        if image is None:
            self.skipped.add(data.decode())
            return np.zeros([0, 0, 3], np.uint8)
        return fit_square(image, size)


class LabelledRecords(LabelledData):
    """TFRecord files of Examples with `image/encoded` and an int64 `image/class/label`."""

    kind = "tfrecords"

    def __init__(self, path: str, files: list[str]):
        super().__init__(path)
        self.files = files
        self._check_format(files[0])

    def _check_format(self, file: str) -> None:
        try:
            record = next(iter(tf.data.TFRecordDataset(file).take(1)), None)
        except tf.errors.OpError as e:
            raise DataError(f"{file} is not a readable TFRecord file ({type(e).__name__})") from None
        if record is None:
            raise DataError(f"TFRecord file {file} is empty")
        try:
            features = tf.train.Example.FromString(record.numpy()).features.feature
        except Exception:  # protobuf's DecodeError; protobuf is TensorFlow's dependency, not ours.
            raise DataError(f"the records of {file} are not tf.train.Example protos") from None
        label = features.get(TFRECORD_LABEL_KEY)
        if TFRECORD_IMAGE_KEY not in features or label is None or label.WhichOneof("kind") != "int64_list":
            found = ", ".join(f"{k} ({v.WhichOneof('kind')})" for k, v in sorted(features.items())) or "none"
            raise DataError(f"TFRecords in {file} need bytes '{TFRECORD_IMAGE_KEY}' and int64 "
                            f"'{TFRECORD_LABEL_KEY}' features (as tensorflow/models slim writes them); found: {found}")

    def fingerprint(self) -> str:
        return _stat_digest(self.files, "tfrecords")

    def _examples(self) -> tf.data.Dataset:
        spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
                TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}

        def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            example = tf.io.parse_single_example(record, spec)
            return example[TFRECORD_IMAGE_KEY], example[TFRECORD_LABEL_KEY]

        # A truncated file or a record without the keys is dropped with a logged warning,
        # as in training input (tf.data cannot say which record failed).
        return tf.data.TFRecordDataset(self.files).map(parse).ignore_errors(log_warning=True)

    def _load(self, data: bytes, size: int) -> np.ndarray:
        image = decode_rgb(data, 1)
        if image is None:
            self.skipped.add(hashlib.sha1(data).hexdigest())
            return np.zeros([0, 0, 3], np.uint8)
        return fit_square(image, size)


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped) -> its array, e.g. uint8 [N, 28, 28] for MNIST images.

    Raises:
      DataError: unreadable, not idx, or shorter than its header says.
    """
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an idx file (its first 4 bytes are not 0, 0, a type code, a rank)")
    rank, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * rank
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if len(raw) >= header else ()
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(shape) != rank or len(raw) != expected:
        raise DataError(f"idx file {path} is truncated or corrupt: {len(raw)} bytes, its header "
                        f"{list(shape)} x {dtype.itemsize} B needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class IdxImages(LabelledData):
    """An idx image file [N, H, W] or [N, H, W, 1|3] and its idx label file [N]."""

    kind = "idx"

    def __init__(self, path: str, images_file: str):
        super().__init__(path)
        labels_file = images_file.replace(IDX_IMAGES, IDX_LABELS)
        if not os.path.isfile(labels_file):
            raise DataError(f"idx images {images_file} have no labels file {labels_file} beside them")
        self.files = [images_file, labels_file]
        self.images, self.labels = read_idx(images_file), read_idx(labels_file)
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[3] not in (1, 3)):
            raise DataError(f"{images_file} holds an array of shape {self.images.shape}, not images [N, H, W(, 1|3)]")
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
            raise DataError(f"{labels_file} holds {self.labels.dtype} {self.labels.shape}, not integer labels [N]")
        if len(self.labels) != len(self.images):
            raise DataError(f"{images_file} has {len(self.images)} images but {labels_file} has {len(self.labels)} labels")
        if self.images.dtype != np.uint8:  # MNIST-style images are bytes; others are taken as 0-255.
            self.images = np.clip(np.rint(self.images), 0, 255).astype(np.uint8)
        self.labels = self.labels.astype(np.int64)

    def count(self, limit: int | None = None) -> int:
        return len(self.images) if limit is None else min(limit, len(self.images))

    def fingerprint(self) -> str:
        return _stat_digest(self.files, "idx")

    def _examples(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((np.arange(len(self.images)), self.labels))

    def _load(self, index: np.ndarray, size: int) -> np.ndarray:
        return fit_square(self.images[int(index)], size)


def _idx_images_file(path: str) -> str | None:
    """The idx images file that `path` names (the file, its prefix, or a directory of one)."""
    if os.path.isfile(path):
        return path if IDX_IMAGES in os.path.basename(path) else None
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path) if IDX_IMAGES in n)
        if len(found) > 1:
            prefixes = sorted({f[: f.index(IDX_IMAGES)] for f in found})
            raise DataError(f"{path} holds several idx image files; pass one prefix: {', '.join(prefixes)}")
        return found[0] if found else None
    candidates = [path + IDX_IMAGES + suffix for suffix in ("", ".gz")]
    return next((c for c in candidates if os.path.isfile(c)), None)


def open_labelled(path: str, classes: list[str] | None = None) -> LabelledData:
    """The labelled data at `path` (see the module docstring for the layouts).

    Args:
      path: class-folder directory, TFRecord file or directory, or idx images file/prefix.
      classes: the training split's class names, for a test split in class folders.

    Raises:
      DataError: if `path` does not exist or is none of the layouts, naming what was found.
    """
    if not os.path.exists(path) and _idx_images_file(path) is None:
        raise DataError(f"labelled data path {path} does not exist")
    if os.path.isfile(path) and is_tfrecord(path):
        return LabelledRecords(path, [path])
    idx_images = _idx_images_file(path)
    if idx_images is not None:
        return IdxImages(path, idx_images)
    if os.path.isfile(path):
        raise DataError(f"{path} is not labelled data: expected a TFRecord file (*.tfrecord), an idx "
                        f"images file (*{IDX_IMAGES}[.gz]) or a directory of class folders")
    records = sorted(p for p in walk_files(path) if is_tfrecord(p))
    if records:
        return LabelledRecords(path, records)
    return ClassFolders(path, classes)
