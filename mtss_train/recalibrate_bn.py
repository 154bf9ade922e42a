"""The trunk's BatchNorm statistics re-estimated on the user's images ("precise BN").

    python -m mtss_train.recalibrate_bn --checkpoint CKPT --data DIR --out OUT_DIR \
        [--batches 100] [--batch_size 64] [--image_size S] [--trunk_size 101|tiny]

Why: a multi-task trunk's moving mean and variance are exponential averages over whatever
each task fed it (rp's small patches, col's grey crops, ex's views, ms's frames), and a
downstream user feeds other images again, so inference normalises with statistics of
nobody's data. The remedy that pycls and Detectron2 call precise BN re-estimates them on
the target images with the weights fixed.

How: the trunk runs over `batches` batches of `batch_size` images of DIR (RGB in [0, 255],
VGG-preprocessed, resized and centre-cropped to the image size the feature extractor and
linear probe use, `mtss_train.data.labelled.fit_square`). Each BatchNorm normalises with
its batch's own moments, as in training, and nothing is updated. At every BatchNorm of the
trunk the per-channel mean and variance of its input over all images and positions are
pooled exactly: the mean of the batch means, and the variance E[x^2] - E[x]^2 over all
batches (combined with Chan et al.'s pairwise update, which avoids the cancellation of
subtracting two large sums), not an exponential moving average. These become
`moving_mean` and `moving_variance`. A layer's input depends on the layers before it, which
normalise by batch moments here as in pycls; with a single batch holding every image the
result is exactly the statistics the recalibrated trunk then meets in inference.

Every other tensor of the checkpoint (weights, head variables and their statistics,
optimizer slots, global_step) is copied bit for bit, and the result is written by
`mtss_train.ckpt.checkpoint_files.save` (atomic) into OUT_DIR under the input's name and step, so the
bundled loader and the released README's recipe restore it as before. OUT_DIR must hold no
checkpoint yet: a recalibrated checkpoint never replaces one.

DIR is what the linear probe reads (class folders, TFRecords with labels, Fashion-MNIST idx
files; labels unused) or what the trainer's --data reads (a directory of images, TFRecords
of encoded images). Library use:

    statistics = recalibrate(checkpoint, open_images(DIR).dataset(96), trunk_size="tiny")
    write_checkpoint(checkpoint, statistics.values, out_dir)
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
from typing import Callable, Mapping

import numpy as np
from absl import app, flags

from mtss_train.ckpt import checkpoint_files
from mtss_train import loader
from mtss_train.model import trunk
from mtss_train.compat import tf
from mtss_train.data.files import is_tfrecord, write_atomically
from mtss_train.data.images import IMAGE_EXTENSIONS, TFRECORD_IMAGE_KEY, decode_rgb, find_sources, read_file
from mtss_train.data.labelled import LabelledData, fit_square, open_labelled
from mtss_train.errors import CheckpointError, DataError, MtssError, cli_main
from mtss_train.eval import features as feats
from mtss_train.model.slim_layer import slim_name
from mtss_train.progress import ProgressLine

DEFAULT_BATCHES = 100
DEFAULT_BATCH_SIZE = 64
# Bump when the estimate changes, so features cached with older statistics stop matching.
VERSION = 1
PROVENANCE_FILE = "recalibrate_bn.json"


@dataclasses.dataclass
class Statistics:
    """Re-estimated BatchNorm statistics.

    Attributes:
      values: slim name -> float32 array, for every `.../moving_mean` and
        `.../moving_variance` of the trunk.
      images: how many images they were computed on (batches * batch_size).
      batches: full batches used (fewer than asked when the data ran out).
      batch_size: images per batch.
    """

    values: dict[str, np.ndarray]
    images: int
    batches: int
    batch_size: int

    def summary(self) -> dict:
        return {"images": self.images, "batches": self.batches, "batch_size": self.batch_size,
                "layers": len(self.values) // 2}


class UnlabelledImages(LabelledData):
    """Image files or TFRecords of encoded images (`images.find_sources`), read once in
    order, as the trainer's --data holds them; every label is -1."""

    kind = "images"

    def __init__(self, path: str):
        super().__init__(path)
        self.source_kind, self.files = find_sources(path)

    def count(self, limit: int | None = None) -> int | None:
        if self.source_kind == "tfrecords":
            return limit
        return len(self.files) if limit is None else min(limit, len(self.files))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.source_kind.encode())
        for path in self.files:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _examples(self) -> tf.data.Dataset:
        if self.source_kind == "files":
            return tf.data.Dataset.from_tensor_slices((self.files, np.full(len(self.files), -1, np.int64)))
        spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string, default_value="")}
        records = tf.data.TFRecordDataset(self.files)
        # A damaged file ends where it breaks, with a logged warning, as the probe's reader does.
        return records.map(lambda r: (tf.io.parse_single_example(r, spec)[TFRECORD_IMAGE_KEY],
                                      tf.constant(-1, tf.int64))).ignore_errors(log_warning=True)

    def _load(self, data: bytes, size: int) -> np.ndarray:
        is_file = self.source_kind == "files"
        image = decode_rgb(read_file(data) if is_file else data, 1)
        if image is None:
            self.skipped.add(data.decode() if is_file else hashlib.sha1(data).hexdigest())
            return np.zeros([0, 0, 3], np.uint8)
        return fit_square(image, size)


def open_images(path: str) -> LabelledData:
    """The images at `path`: a layout of the linear probe (`open_labelled`), else image files
    or TFRecords without labels.

    Raises:
      DataError: `path` does not exist or holds neither.
    """
    try:
        return open_labelled(path)
    except DataError:
        if not (os.path.isdir(path) or is_tfrecord(path) or path.lower().endswith(IMAGE_EXTENSIONS)):
            raise
    return UnlabelledImages(path)


def _batch_norm_inputs(graph: tf.Graph) -> dict[str, tf.Tensor]:
    """BatchNorm scope (e.g. `.../unit_1/bottleneck_v2/preact`) -> the tensor it normalises,
    for every fused BatchNorm op of `graph` (slim's BatchNorm on 4-D NHWC input)."""
    found = {}
    for op in graph.get_operations():
        if op.type.startswith("FusedBatchNorm"):
            found[op.name.rsplit("/", 1)[0]] = op.inputs[0]
    return found


def _as_batches(images: tf.data.Dataset | np.ndarray, batch_size: int, batches: int) -> tf.data.Dataset:
    """Batches of images (the first element of pairs such as (image, label))."""
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images)
    if isinstance(images.element_spec, tuple):
        images = images.map(lambda image, *_: image)
    return images.batch(batch_size).take(batches).prefetch(2)


def _moments_graph(weights: str | Mapping[str, np.ndarray], trunk_size: str, output_stride: int | None) -> tuple[
        tf.Graph, tf.Tensor, dict[str, tuple[tf.Tensor, tf.Tensor, tf.Tensor]], Callable[[tf.compat.v1.Session], None]]:
    """A TF1 graph of the trunk with training-mode BatchNorm: (graph, images placeholder,
    BN scope -> (mean, variance, values per channel) of its input, restore_fn(session)).

    Raises:
      CheckpointError: the weights lack a trunk variable or do not fit it.
    """
    graph = tf.Graph()
    with graph.as_default():
        # Every variable is restored before use; a seed only lets the initializers be built
        # under op determinism, which refuses random ops without one.
        tf.compat.v1.set_random_seed(0)
        inputs = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
        # Each BatchNorm normalises by its batch's moments; its moving averages are never read.
        trunk.block3_net(trunk_size, output_stride)(trunk.vgg_preprocess(inputs), is_training=True)
        variables = {slim_name(v): v for v in tf.compat.v1.global_variables()}
        moments = {}
        for scope, x in _batch_norm_inputs(graph).items():
            mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
            moments[scope] = (mean, variance, tf.size(x, tf.int64) // tf.shape(x, tf.int64)[-1])
        missing = [n for n in variables if n.endswith("/moving_mean") and n[: -len("/moving_mean")] not in moments]
        if missing:  # A BatchNorm that is not fused would escape the estimate.
            raise RuntimeError(f"no fused BatchNorm op found for {', '.join(missing[:3])}")
        if isinstance(weights, str):
            restore, _ = loader.graph_restore_fn(weights)
            return graph, inputs, moments, restore
        wrong = [n for n, v in variables.items() if n not in weights
                 or tuple(np.shape(weights[n])) != tuple(v.shape.as_list())]
        if wrong:
            raise CheckpointError(f"the weights lack {len(wrong)} variable(s) of the {trunk_size} trunk "
                                  f"(missing or of another shape), e.g. {', '.join(sorted(wrong)[:3])}")
        feed = {v.initial_value: weights[n] for n, v in variables.items()}

    def initialize(sess: tf.compat.v1.Session) -> None:
        sess.run([v.initializer for v in variables.values()], feed)

    return graph, inputs, moments, initialize


def recalibrate(
    weights: str | Mapping[str, np.ndarray],
    images: tf.data.Dataset | np.ndarray,
    trunk_size: str | None = None,
    output_stride: int | None = None,
    batches: int = DEFAULT_BATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress_label: str | None = None,
    available: int | None = None,
) -> Statistics:
    """Re-estimates the trunk's BatchNorm moving statistics on `images` (module docstring).

    Args:
      weights: a checkpoint (prefix, file or directory; restored the released README's way,
        `loader.graph_restore_fn`) or slim name -> value of every trunk variable (others
        are ignored).
      images: RGB in [0, 255], [N, S, S, 3] or a dataset of [S, S, 3] images or of
        (image, ...) tuples such as `LabelledData.dataset(S)`; S as the trunk's users see.
      trunk_size: '101' or 'tiny'; None: the one the checkpoint holds (needs a checkpoint).
      output_stride: atrous block3 stride the trunk is used at (None: 32).
      batches: full batches of `batch_size` images to use at most; a short last batch is
        left out, so every batch weighs the same.
      progress_label: when given, a progress line with ETA on stderr names it.
      available: how many images `images` holds, if known (the progress line's total).

    Returns:
      The new statistics.

    Raises:
      CheckpointError: the weights lack a trunk variable or do not fit it.
      DataError: fewer usable images than one batch.
    """
    if isinstance(weights, str):
        weights = checkpoint_files.resolve(weights)
        trunk_size = trunk_size or loader.detect_trunk_size(weights) or "101"
    elif trunk_size is None:
        raise ValueError("recalibrate needs trunk_size when given weights rather than a checkpoint")
    graph, inputs, moments, restore = _moments_graph(weights, trunk_size, output_stride)
    # Per layer: (values per channel so far, their mean, sum of squared deviations), float64.
    pooled = {scope: (0, 0.0, 0.0) for scope in moments}
    known = len(images) if isinstance(images, np.ndarray) else available
    total = batch_size * (batches if known is None else min(batches, known // batch_size))
    used = short = 0
    # The images come from eager tf.data, so `graph` is the default only while restoring.
    sess = tf.compat.v1.Session(graph=graph)
    with ProgressLine(progress_label or "", total, "images", enabled=bool(progress_label)) as progress:
        try:
            with graph.as_default():
                restore(sess)
            for batch in _as_batches(images, batch_size, batches).as_numpy_iterator():
                if len(batch) < batch_size:
                    short = len(batch)
                    break
                for scope, found in sess.run(moments, {inputs: batch}).items():
                    pooled[scope] = _combine(pooled[scope], found)
                used += 1
                progress.advance(len(batch))
        finally:
            sess.close()
        progress.finish()
    if not used:
        raise DataError("no usable image" if not short else f"only {short} usable image(s), fewer than "
                        f"one batch of {batch_size}: pass a smaller batch size")
    values = {}
    for scope, (count, mean, m2) in pooled.items():
        values[f"{scope}/moving_mean"] = np.asarray(mean, np.float32)
        values[f"{scope}/moving_variance"] = np.asarray(m2 / count, np.float32)
    return Statistics(values, used * batch_size, used, batch_size)


def _combine(pooled: tuple, batch: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s update: (count, mean, sum of squared deviations) of all values so far
    and a batch's (mean, variance, count) -> those of both together."""
    count, mean, m2 = pooled
    batch_mean, batch_variance, n = np.asarray(batch[0], np.float64), np.asarray(batch[1], np.float64), int(batch[2])
    total = count + n
    delta = batch_mean - mean
    return total, mean + delta * (n / total), m2 + batch_variance * n + delta**2 * (count * n / total)


def write_checkpoint(checkpoint: str, statistics: Mapping[str, np.ndarray], out_dir: str) -> str:
    """Writes `checkpoint` into `out_dir` with `statistics` (slim name -> value) in place of
    the tensors of those names; every other tensor is copied bit for bit. The checkpoint
    keeps its name and step (`model.ckpt-1500` stays `model.ckpt-1500`).

    Returns:
      The new checkpoint's prefix.

    Raises:
      CheckpointError: the checkpoint is unreadable or lacks a tensor of `statistics`, or
        the write failed. MtssError: `out_dir` is a file or already holds a checkpoint.
    """
    prefix = checkpoint_files.resolve(checkpoint)
    check_out_dir(out_dir)
    tensors = checkpoint_files.read_tensors(prefix)
    for name, value in statistics.items():
        if name not in tensors or tensors[name].shape != np.shape(value):
            found = tensors[name].shape if name in tensors else "no such tensor"
            raise CheckpointError(f"checkpoint {prefix} does not fit the statistics: {name} is {found}, "
                                  f"the new value {np.shape(value)}")
        tensors[name] = np.asarray(value, tensors[name].dtype)
    numbered = re.fullmatch(r"(.+)-(\d+)", os.path.basename(prefix))
    basename, step = (numbered.group(1), int(numbered.group(2))) if numbered else (os.path.basename(prefix), 0)
    return checkpoint_files.save(out_dir, tensors, step, basename=basename)


def check_out_dir(out_dir: str) -> None:
    """Raises MtssError unless `out_dir` can take a new checkpoint without replacing one."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MtssError(f"{out_dir} is a file; the recalibrated checkpoint goes into a directory")
    existing = checkpoint_files.latest(out_dir)
    if existing:
        raise MtssError(f"{out_dir} already holds checkpoint {existing}; write the recalibrated one to a new directory")


class RecalibratedTrunk(loader.Trunk):
    """A feature extractor's trunk whose BatchNorm statistics are re-estimated on `data`
    (its first `batches` batches of `settings.batch_size`, within `limit`) before the first
    feature is computed; the checkpoint on disk is not touched.

    Its digest, the feature cache's key, covers the recalibration data and settings, so
    features of the plain trunk and of the recalibrated one never mix; a cache hit neither
    builds the trunk nor recalibrates it.
    """

    def __init__(self, checkpoint: str, settings: feats.Settings, data: LabelledData, batches: int,
                 limit: int | None):
        super().__init__(checkpoint, settings)
        self.data, self.batches, self.limit, self.batch_size = data, batches, limit, settings.batch_size
        self.image_size = settings.image_size or feats.DEFAULT_IMAGE_SIZE[self.size]

    @property
    def extractor(self) -> loader.FeatureExtractor:
        extractor = self._built()
        if self.recalibrate_bn is None:
            variables = extractor.layer.variables_by_name()
            found = recalibrate({n: v.numpy() for n, v in variables.items()},
                                self.data.dataset(self.image_size, self.limit), self.size, self.output_stride,
                                self.batches, self.batch_size, f"BatchNorm statistics of {self.data.path}",
                                self.data.count(self.limit))
            for name, value in found.values.items():
                variables[name].assign(value)
            self.recalibrate_bn = {"data": self.data.path, **found.summary()}
        return extractor

    @property
    def digest(self) -> str:
        identity = {"weights": super().digest, "version": VERSION, "data": self.data.fingerprint(),
                    "limit": self.limit, "batches": self.batches, "batch_size": self.batch_size,
                    "image_size": self.image_size, "output_stride": self.output_stride}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags, in `values`. Not at import: the evaluation commands' --checkpoint
    and --data mean other things, and a process may import both."""
    flags.DEFINE_string("checkpoint", None, "Checkpoint (prefix, file or train dir) whose trunk to recalibrate.",
                        required=True, flag_values=values)
    flags.DEFINE_string("data", None, "Images: class folders, TFRecords, idx files, or a directory of images.",
                        required=True, flag_values=values)
    flags.DEFINE_string("out", None, "New directory for the recalibrated checkpoint.", required=True,
                        flag_values=values)
    flags.DEFINE_integer("batches", DEFAULT_BATCHES, "Batches to estimate the statistics on, at most.",
                         flag_values=values)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Images per batch.", flag_values=values)
    flags.DEFINE_integer("image_size", None, "Images are resized and centre-cropped to this square "
                         "(default 224 for the 101 trunk, 96 for tiny, as the linear probe).", flag_values=values)
    flags.DEFINE_enum("trunk_size", None, list(trunk.TRUNK_SIZES), "Trunk; default: the one the checkpoint holds.",
                      flag_values=values)


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {' '.join(argv[1:])}; the checkpoint is --checkpoint")
    for name in ("batches", "batch_size", "image_size"):
        if values[name].value is not None and values[name].value < 1:
            raise MtssError(f"--{name} must be positive, got {values[name].value}")
    prefix = checkpoint_files.resolve(values.checkpoint)
    held = loader.detect_trunk_size(prefix)
    size = values.trunk_size or held or "101"
    if held and held != size:
        raise CheckpointError(f"checkpoint {prefix} holds the {held} trunk, not the {size}: pass --trunk_size {held}")
    check_out_dir(values.out)  # Before the work, not after it.
    data = open_images(values.data)
    image_size = values.image_size or feats.DEFAULT_IMAGE_SIZE[size]
    try:
        found = recalibrate(prefix, data.dataset(image_size), size, None, values.batches, values.batch_size,
                            f"BatchNorm statistics of {values.data}", data.count())
    except DataError as e:
        raise DataError(f"{values.data}: {e} ({data.skipped.count} undecodable image(s) skipped)") from None
    written = write_checkpoint(prefix, found.values, values.out)
    provenance = {"checkpoint": prefix, "data": values.data, "image_size": image_size, "trunk_size": size,
                  "skipped": data.skipped.count, "version": VERSION, **found.summary()}
    text = json.dumps(provenance, indent=2) + "\n"
    write_atomically(os.path.join(values.out, PROVENANCE_FILE),
                     lambda temporary: pathlib.Path(temporary).write_text(text))
    print(f"re-estimated {found.summary()['layers']} BatchNorm layers on {found.images:,} images "
          f"({found.batches} batches of {found.batch_size}) of {values.data}; every other tensor copied "
          f"unchanged", file=sys.stderr)
    print(written)


if __name__ == "__main__":
    define_flags()
    app.run(cli_main(main))
