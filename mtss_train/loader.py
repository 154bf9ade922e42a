"""The bundled loader for mtss / released multi-task ResNet-v2-101 checkpoints.

Two ways in, both restoring by slim variable name and both returning a RestoreReport
(matched / missing in checkpoint / unused in checkpoint / shape-dtype mismatch):

TF1 graph, the released README's recipe done right. The README snippet compares
`name.encode('ascii')` (bytes) with `list_variables` names (str), which on Python 3 never
match, so it silently restores nothing; here names are compared as str and an empty or
partial trunk match is an error:

    with slim.arg_scope(trunk_arg_scope()):
        _, end_points = resnet_v2.resnet_v2_101(images, is_training=False,
                                                scope='resnet_v2_101')
    restore, report = graph_restore_fn(ckpt)
    print(report.format())
    with tf.compat.v1.Session() as sess:
        restore(sess)
        features = sess.run(end_points['resnet_v2_101/block3'])

TF2, a block3 feature extractor:

    extractor = load_feature_extractor(ckpt)
    features = extractor(images_uint8_rgb)  # [N, H/32, W/32, 1024]

The same for programs that take a checkpoint or `random` weights and any trunk size
(evaluation, export): `Trunk` checks the checkpoint at once, detects the trunk size it
holds and builds the extractor on first use:

    extractor = Trunk(ckpt, TrunkSettings(output_stride=16)).extractor
"""

import dataclasses
import hashlib
import os
from typing import Callable, Iterable

from mtss_train.ckpt import checkpoint_files
from mtss_train.model import trunk
from mtss_train.ckpt.checkpoint_files import RestoreReport
from mtss_train.compat import tf
from mtss_train.errors import CheckpointError, MtssError
from mtss_train.model.slim_layer import SlimLayer, slim_name

# In place of a checkpoint: the trunk's initial weights, seeded (a baseline, not a model).
RANDOM = "random"


def graph_restore_fn(
    checkpoint: str,
    var_list: Iterable[tf.Variable] | None = None,
    exclude_scopes: Iterable[str] = (),
    required_scopes: Iterable[str] = trunk.TRUNK_SCOPES,
) -> tuple[Callable[[tf.compat.v1.Session], None], RestoreReport]:
    """Restores the variables of the current TF1 graph that the checkpoint also has.

    Args:
      checkpoint: checkpoint prefix, one of its files, or a directory (latest in it).
      var_list: candidates; all global variables of the default graph by default.
      exclude_scopes: name prefixes never restored.
      required_scopes: name prefixes whose every graph variable must be restored; the
        trunk through block3 by default. Pass () to restore any intersection.

    Returns:
      (restore_fn, report): `restore_fn(sess)` loads the matched variables.

    Raises:
      CheckpointError: unreadable checkpoint, or a required variable missing / misshaped.
    """
    variables = var_list if var_list is not None else tf.compat.v1.global_variables()
    by_name = {slim_name(v): v for v in variables}
    wanted = {name: checkpoint_files.spec_of(v) for name, v in by_name.items()}
    report = checkpoint_files.match(wanted, checkpoint, exclude_scopes)
    report.require(required_scopes)
    saver = tf.compat.v1.train.Saver(var_list={n: by_name[n] for n in report.matched})

    def restore_fn(sess: tf.compat.v1.Session) -> None:
        saver.restore(sess, report.checkpoint)

    return restore_fn, report


class FeatureExtractor:
    """Callable: RGB images `[N, H, W, 3]` in [0, 255] -> block3 features `[N, h, w, C]`.

    BatchNorm runs on its moving statistics (frozen). `report` is the `RestoreReport` of
    the restore, None for random weights.
    """

    def __init__(self, layer: SlimLayer, report: RestoreReport):
        self.layer = layer
        self.report = report

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def _features(self, images: tf.Tensor) -> tf.Tensor:
        block3, _ = self.layer(trunk.vgg_preprocess(images), training=False)
        return block3

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """block3 features of `images` (any numeric dtype; VGG preprocessing is applied here)."""
        return self._features(tf.cast(images, tf.float32))


def trunk_layer(size: str = "101", output_stride: int | None = None) -> SlimLayer:
    """A built TF2 layer (variables created): VGG-preprocessed images -> (block3, end_points)."""
    layer = SlimLayer(trunk.block3_net(size, output_stride), name="trunk")
    layer(tf.zeros([1, 64, 64, 3]), training=False)  # Creates the variables.
    return layer


def load_feature_extractor(
    checkpoint: str,
    size: str = "101",
    output_stride: int | None = None,
) -> FeatureExtractor:
    """A TF2 block3 feature extractor with every trunk variable restored from `checkpoint`.

    Raises:
      CheckpointError: unreadable checkpoint, or any trunk variable missing / misshaped.
    """
    layer = trunk_layer(size, output_stride)
    report = checkpoint_files.restore_variables(
        layer.variables_by_name(), checkpoint, required_scopes=trunk.TRUNK_SCOPES
    )
    return FeatureExtractor(layer, report)


def detect_trunk_size(prefix: str) -> str | None:
    """The trunk size whose block3 the checkpoint holds, or None if none fits."""
    specs = checkpoint_files.read_specs(prefix)
    for size in trunk.TRUNK_SIZES:
        units = trunk.trunk_blocks(size)[2].args
        name = f"{trunk.REPRESENTATION}/unit_{{}}/bottleneck_v2/conv3/weights"
        last = specs.get(name.format(len(units)))
        if last is not None and last.shape[-1] == units[-1]["depth"] and name.format(len(units) + 1) not in specs:
            return size
    return None


@dataclasses.dataclass(frozen=True)
class TrunkSettings:
    """Which trunk a `Trunk` builds. None trunk_size: the one the checkpoint holds (101 for
    `random`); None output_stride: 32; `seed` seeds `random` weights."""

    trunk_size: str | None = None
    output_stride: int | None = None
    seed: int = 0


class Trunk:
    """The frozen trunk of a checkpoint, or seeded initial weights (`random`).

    The network is built on first use of `extractor`, so a caller that only needs the
    trunk's identity (`digest`, e.g. a cache hit) never builds it.

    Raises:
      CheckpointError: the checkpoint does not exist (at once) or does not fit (when built).
      MtssError: `settings.trunk_size` is not a trunk size.
    """

    def __init__(self, checkpoint: str, settings: TrunkSettings):
        self.checkpoint = checkpoint
        self.prefix = None if checkpoint == RANDOM else checkpoint_files.resolve(checkpoint)
        self.size = settings.trunk_size or (self.prefix and detect_trunk_size(self.prefix)) or "101"
        if self.size not in trunk.TRUNK_SIZES:
            raise MtssError(f"--trunk_size must be one of {', '.join(trunk.TRUNK_SIZES)}, got {self.size!r}")
        self.output_stride, self.seed = settings.output_stride, settings.seed
        self._extractor: FeatureExtractor | None = None
        self._digest: str | None = None
        # How a subclass (`mtss_train.recalibrate_bn.RecalibratedTrunk`) re-estimated the
        # BatchNorm statistics before extraction (JSON-able: data, images, batches); None: as stored.
        self.recalibrate_bn: dict | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        """The trunk that computes the features."""
        return self._built()

    def _built(self) -> FeatureExtractor:
        """The trunk as stored (checkpoint or seeded initial weights), built once."""
        if self._extractor is None:
            if self.prefix is None:
                tf.random.set_seed(self.seed)  # Resets TF's op-seed sequence: same seed, same weights.
                self._extractor = FeatureExtractor(trunk_layer(self.size, self.output_stride), None)
            else:
                try:
                    self._extractor = load_feature_extractor(self.prefix, self.size, self.output_stride)
                except CheckpointError as e:
                    held = detect_trunk_size(self.prefix)
                    if held is None or held == self.size:
                        raise
                    raise CheckpointError(f"{e} (it holds the {held} trunk: pass --trunk_size {held})") from None
        return self._extractor

    @property
    def digest(self) -> str:
        """sha256 of the checkpoint's files, or of the random weights (they exist only in memory)."""
        if self._digest is None:
            digest = hashlib.sha256()
            if self.prefix is None:
                for name, variable in sorted(self._built().layer.variables_by_name().items()):
                    digest.update(name.encode() + variable.numpy().tobytes())
            else:
                directory = os.path.dirname(self.prefix) or "."
                base = os.path.basename(self.prefix)
                for name in sorted(os.listdir(directory)):
                    if name == base + ".index" or name.startswith(base + ".data-"):
                        with open(os.path.join(directory, name), "rb") as f:
                            for chunk in iter(lambda: f.read(1 << 22), b""):
                                digest.update(chunk)
            self._digest = digest.hexdigest()
        return self._digest

    def describe(self) -> str:
        """The checkpoint prefix, or `random init (seed N)`, for logs and result files."""
        return f"random init (seed {self.seed})" if self.prefix is None else self.prefix
