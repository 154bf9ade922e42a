import numpy as np
import pytest
from tf_slim.nets import resnet_v2

from mtss_train.ckpt import inspector
from mtss_train import loader
from mtss_train.model import trunk
from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError
from mtss_train.model.slim_layer import SlimLayer


def slim_reference_specs():
    """Variables of tf_slim's own resnet_v2_101 built the released README's way."""
    with tf.Graph().as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            resnet_v2.resnet_v2_101(images, is_training=False, scope="resnet_v2_101")
        return {
            v.op.name: (tuple(v.shape.as_list()), v.dtype.base_dtype.name)
            for v in tf.compat.v1.global_variables()
        }


@pytest.mark.slow
def test_real_trunk_has_exactly_slims_variables_through_block3():
    reference = slim_reference_specs()
    expected = {n: s for n, s in reference.items() if not n.startswith(trunk.NOT_IN_TRUNK)}
    ours = {n: (s.shape, s.dtype) for n, s in inspector.trunk_specs("101").items()}
    assert ours == expected
    assert len(ours) == 488
    assert ours["resnet_v2_101/block3/unit_23/bottleneck_v2/conv3/weights"] == (
        (1, 1, 256, 1024),
        "float32",
    )
    assert not any("postnorm" in n for n in ours)


@pytest.mark.slow
def test_real_trunk_in_tf2_keeps_slim_names_and_block3_geometry():
    layer = loader.trunk_layer("101")
    assert {n: (s.shape, s.dtype) for n, s in inspector.trunk_specs("101").items()} == {
        n: (tuple(v.shape.as_list()), v.dtype.name) for n, v in layer.variables_by_name().items()
    }
    images = tf.zeros([1, 224, 224, 3])
    assert layer(images, training=False)[0].shape == (1, 7, 7, 1024)
    atrous = loader.trunk_layer("101", output_stride=16)
    assert atrous(images, training=False)[0].shape == (1, 14, 14, 1024)


@pytest.mark.parametrize(
    "output_stride, size", [(None, 2), (32, 2), (16, 4), (8, 8)]
)
def test_block3_resolution_follows_output_stride(output_stride, size):
    layer = loader.trunk_layer("tiny", output_stride=output_stride)
    features, _ = tf.function(lambda x: layer(x, training=False))(tf.zeros([3, 64, 64, 3]))
    assert features.shape == (3, size, size, 128)


def test_output_stride_can_change_per_call_over_one_set_of_variables(tiny_trunk):
    images = tf.zeros([1, 64, 64, 3])
    variables = list(tiny_trunk.variables)
    nominal, _ = tiny_trunk(images, training=False)
    atrous, end_points = tiny_trunk(images, training=False, output_stride=16)
    assert (nominal.shape, atrous.shape) == ((1, 2, 2, 128), (1, 4, 4, 128))
    assert tiny_trunk.variables == variables
    units = [f"{trunk.REPRESENTATION}/unit_{i}/bottleneck_v2" for i in range(1, 5)]
    assert [end_points[u].shape for u in units] == [(1, 4, 4, 128)] * 4  # Each unit's output.
    np.testing.assert_array_equal(end_points[units[-1]], atrous)


def test_end_points_are_keyed_by_slim_names_and_do_not_pile_up_eagerly():
    def net_fn(images, is_training):
        with slim.arg_scope(trunk.trunk_arg_scope()):
            return trunk.resnet_v2_101_block3(images, is_training, blocks=trunk.trunk_blocks("tiny"))

    layer = SlimLayer(net_fn, name="probe")
    for _ in range(2):
        block3, end_points = layer(tf.zeros([1, 64, 64, 3]), training=False)
    assert end_points[trunk.REPRESENTATION] is block3
    assert end_points["resnet_v2_101/block1"].shape == (1, 8, 8, 32)
    assert end_points["resnet_v2_101/block2"].shape == (1, 4, 4, 64)
    graph = tf.compat.v1.get_default_graph()
    assert all(len(graph.get_collection(k)) == 0 for k in graph.get_all_collection_keys())


def test_batch_norm_moving_statistics_update_only_when_training(tiny_trunk, images):
    name = "resnet_v2_101/block2/unit_1/bottleneck_v2/preact/moving_mean"
    moving_mean = tiny_trunk.variables_by_name()[name]
    before = moving_mean.numpy().copy()
    step = tf.function(lambda x, training: tiny_trunk(x, training=training), reduce_retracing=True)
    step(trunk.vgg_preprocess(images), False)
    np.testing.assert_array_equal(moving_mean.numpy(), before)
    step(trunk.vgg_preprocess(images), True)
    assert np.abs(moving_mean.numpy() - before).max() > 0


def test_weight_decay_losses_cover_every_conv_weight(tiny_trunk):
    weights = [n for n in tiny_trunk.variables_by_name() if n.endswith("/weights")]
    assert len(tiny_trunk.losses) == len(weights) > 0


def test_vgg_preprocess_subtracts_the_imagenet_rgb_mean():
    pixel = trunk.vgg_preprocess(tf.constant([[[[0, 128, 255]]]], tf.uint8))
    np.testing.assert_allclose(pixel.numpy().ravel(), [-123.68, 128 - 116.779, 255 - 103.939], rtol=1e-6)


def test_bad_trunk_arguments_raise():
    with pytest.raises(MtssError, match="multiple of 4"):
        loader.trunk_layer("tiny", output_stride=6)
    with pytest.raises(MtssError, match="block3 reaches"):
        loader.trunk_layer("tiny", output_stride=64)
    with pytest.raises(MtssError, match="unknown trunk size"):
        trunk.trunk_blocks("152")


def test_training_flag_must_be_a_python_bool(tiny_trunk):
    with pytest.raises(TypeError, match="Python bool"):
        tiny_trunk(tf.zeros([1, 32, 32, 3]), training=tf.constant(True))
