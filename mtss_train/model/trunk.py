"""The shared trunk: tf-slim ResNet-v2-101 through block3 [1, 2].

The released multi-task model (Doersch & Zisserman, ICCV 2017) trains slim's
`resnet_v2_101` only through block3 and uses `end_points['resnet_v2_101/block3']` as the
representation. This module builds exactly those layers, with slim's own building blocks,
under the variable scope `resnet_v2_101`, so variable names match slim's and the released
checkpoint's one for one.

Unlike `resnet_v2.resnet_v2`, it stops after block3 without appending the `postnorm`
BatchNorm: slim would give a block3-only stack a 1024-channel `resnet_v2_101/postnorm`,
which clashes with the 2048-channel one of the full network when a checkpoint is restored
the released README's way.

Usage (TF1 graph or inside `mtss_train.model.slim_layer.SlimLayer`):

    with slim.arg_scope(trunk_arg_scope()):
        block3, end_points = resnet_v2_101_block3(vgg_preprocess(images), is_training=True)

[1] He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
[2] He, Zhang, Ren, Sun. Identity Mappings in Deep Residual Networks. ECCV 2016.
"""

from typing import Callable, Sequence

from tf_slim.nets import resnet_utils, resnet_v2

from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError

TRUNK_SCOPE = "resnet_v2_101"
REPRESENTATION = TRUNK_SCOPE + "/block3"
# Scopes the full slim resnet_v2_101 has and this trunk never creates; exclude them when
# loading mtss weights into a full ResNet (and when warm-starting from a full one).
NOT_IN_TRUNK = (TRUNK_SCOPE + "/block4", TRUNK_SCOPE + "/postnorm", TRUNK_SCOPE + "/logits")
# Scopes whose variables make up the trunk; a restore that misses any of them is broken.
TRUNK_SCOPES = tuple(f"{TRUNK_SCOPE}/{s}/" for s in ("conv1", "block1", "block2", "block3"))
VGG_MEAN_RGB = (123.68, 116.779, 103.939)

# (scope, base depth, units) of ResNet-v2-101 blocks 1-3; each halves resolution at its end.
_BLOCKS = {
    "101": (("block1", 64, 3), ("block2", 128, 4), ("block3", 256, 23)),
    # Same code path and scope names, ~1% of the compute: for tests and smoke runs.
    "tiny": (("block1", 8, 1), ("block2", 16, 1), ("block3", 32, 4)),
}
TRUNK_SIZES = tuple(_BLOCKS)
ROOT_STRIDE = 4  # conv1 (stride 2) and pool1 (stride 2), before block1.


def trunk_blocks(size: str = "101") -> list[resnet_utils.Block]:
    """The slim block specs of the trunk: `size` is '101' (the real one) or 'tiny'.

    Raises:
      MtssError: for another size (a user's setting reaches here, e.g. through the loader).
    """
    if size not in _BLOCKS:
        raise MtssError(f"unknown trunk size {size!r}; expected one of {', '.join(TRUNK_SIZES)}")
    return [
        resnet_v2.resnet_v2_block(scope, base_depth=depth, num_units=units, stride=2)
        for scope, depth, units in _BLOCKS[size]
    ]


def trunk_arg_scope(weight_decay: float = 1e-4, batch_norm_decay: float = 0.997) -> dict:
    """slim's ResNet arg_scope with the settings of the released model (eps 1e-5, BN scale)."""
    return resnet_utils.resnet_arg_scope(
        weight_decay=weight_decay,
        batch_norm_decay=batch_norm_decay,
        batch_norm_epsilon=1e-5,
        batch_norm_scale=True,
    )


def vgg_preprocess(images: tf.Tensor) -> tf.Tensor:
    """RGB images in [0, 255], any numeric dtype -> float32 minus the ImageNet mean."""
    return tf.cast(images, tf.float32) - tf.constant(VGG_MEAN_RGB, tf.float32)


def resnet_v2_101_block3(
    inputs: tf.Tensor,
    is_training: bool,
    output_stride: int | None = None,
    blocks: Sequence[resnet_utils.Block] | None = None,
    scope: str = TRUNK_SCOPE,
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """ResNet-v2-101 from the root block through block3, as slim names and builds it.

    Args:
      inputs: [batch, height, width, 3] VGG-preprocessed images (see `vgg_preprocess`).
      is_training: Python bool; BatchNorm uses batch statistics and updates its moving
        averages when True.
      output_stride: None for the nominal stride 32 at block3; 8 or 16 for atrous
        (dilated) block3 features with the same variables, for dense heads.
      blocks: block specs, `trunk_blocks('101')` by default.
      scope: variable scope; keep the default for checkpoint compatibility.

    Returns:
      block3: [batch, ceil(height/s), ceil(width/s), 4 * block3 base depth] (1024 for
        the real trunk), s = output_stride or 32.
      end_points: slim end points keyed by full name, e.g. 'resnet_v2_101/block3'.

    Raises:
      MtssError: if block3 cannot have `output_stride` (4, 8, 16 and 32 for the trunk's blocks).
    """
    blocks = trunk_blocks("101") if blocks is None else blocks
    check_output_stride(output_stride, blocks)
    block_stride = None if output_stride is None else output_stride // ROOT_STRIDE
    with tf.compat.v1.variable_scope(scope, values=[inputs]) as sc:
        end_points_collection = sc.original_name_scope + "_end_points"
        with slim.arg_scope(
            [slim.conv2d, resnet_v2.bottleneck, resnet_utils.stack_blocks_dense],
            outputs_collections=end_points_collection,
        ), slim.arg_scope([slim.batch_norm], is_training=is_training):
            # No BN or ReLU in conv1: the first pre-activation unit applies them ([2], app.).
            with slim.arg_scope([slim.conv2d], activation_fn=None, normalizer_fn=None):
                net = resnet_utils.conv2d_same(inputs, 64, 7, stride=2, scope="conv1")
            net = slim.max_pool2d(net, [3, 3], stride=2, scope="pool1")
            net = resnet_utils.stack_blocks_dense(net, blocks, block_stride)
        end_points = slim.utils.convert_collection_to_dict(end_points_collection)
        if tf.executing_eagerly():
            # Eager calls all share one global graph, whose collection would grow forever.
            tf.compat.v1.get_default_graph().clear_collection(end_points_collection)
    return net, end_points


def check_output_stride(output_stride: int | None, blocks: Sequence[resnet_utils.Block]) -> None:
    """Raises MtssError unless block3 over `blocks` can have `output_stride` (None: the
    nominal one). slim's `stack_blocks_dense` keeps each unit's stride until the running
    stride reaches the target and dilates after it, so the target must be the root block's
    stride times a running product of the units' strides: 4, 8, 16 or 32 for the trunk."""
    reachable = [ROOT_STRIDE]
    for unit in (unit for block in blocks for unit in block.args):
        if unit["stride"] > 1:
            reachable.append(reachable[-1] * unit["stride"])
    if output_stride is not None and output_stride not in reachable:
        raise MtssError(f"output_stride must be a multiple of 4 that block3 reaches "
                        f"({', '.join(map(str, reachable))}), got {output_stride}")


def block3_units(end_points: dict[str, tf.Tensor]) -> list[str]:
    """End-point names of block3's unit outputs, in order (unit_1 ... unit_23 in the 101)."""
    prefix = REPRESENTATION + "/unit_"
    units = [k for k in end_points if k.startswith(prefix) and k.endswith("/bottleneck_v2")]
    return sorted(units, key=lambda k: int(k[len(prefix):].split("/")[0]))


def block3_net(
    size: str = "101",
    output_stride: int | None = None,
    weight_decay: float = 1e-4,
    batch_norm_decay: float = 0.997,
    freeze_batch_norm: bool = False,
) -> Callable[..., tuple[tf.Tensor, dict[str, tf.Tensor]]]:
    """The trunk as a net function for `SlimLayer`, built under
    `trunk_arg_scope(weight_decay, batch_norm_decay)`:

        net(images, is_training, output_stride=output_stride) -> (block3, end_points)

    `images` are VGG-preprocessed. `output_stride` may be given per call: each value builds
    block3 at that stride over the same variables (one trace per value under tf.function).
    With `freeze_batch_norm`, BatchNorm uses (and keeps) its moving statistics also when
    `is_training`.

    Raises:
      MtssError: for an unknown `size` or an `output_stride` block3 cannot have.
    """
    blocks = trunk_blocks(size)
    check_output_stride(output_stride, blocks)  # Now, not inside a Keras call that rewraps the error.
    default_stride = output_stride

    def net(
        images: tf.Tensor, is_training: bool, output_stride: int | None = default_stride
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        with slim.arg_scope(trunk_arg_scope(weight_decay, batch_norm_decay)):
            # The trunk's is_training steers its BatchNorm and nothing else.
            batch_norm_training = is_training and not freeze_batch_norm
            return resnet_v2_101_block3(images, batch_norm_training, output_stride=output_stride, blocks=blocks)

    return net
