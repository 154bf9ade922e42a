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
"""

from typing import Callable, Iterable

from mtss_train.ckpt import checkpoint_files
from mtss_train.model import trunk
from mtss_train.ckpt.checkpoint_files import RestoreReport, TensorSpec
from mtss_train.compat import tf
from mtss_train.model.slim_layer import SlimLayer, slim_name


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
    wanted = {
        name: TensorSpec(tuple(v.shape.as_list()), v.dtype.base_dtype.name)
        for name, v in by_name.items()
    }
    report = checkpoint_files.match(wanted, checkpoint, exclude_scopes)
    report.require(required_scopes)
    saver = tf.compat.v1.train.Saver(var_list={n: by_name[n] for n in report.matched})

    def restore_fn(sess: tf.compat.v1.Session) -> None:
        saver.restore(sess, report.checkpoint)

    return restore_fn, report


class FeatureExtractor:
    """Callable: RGB images in [0, 255] [N, H, W, 3] -> block3 features (frozen BN)."""

    def __init__(self, layer: SlimLayer, report: RestoreReport):
        self.layer = layer
        self.report = report

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def _features(self, images: tf.Tensor) -> tf.Tensor:
        block3, _ = self.layer(trunk.vgg_preprocess(images), training=False)
        return block3

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
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
