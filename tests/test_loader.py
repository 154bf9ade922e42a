import numpy as np
import pytest
from tf_slim.nets import resnet_v2

from mtss_train.ckpt import checkpoint_files
from mtss_train import loader
from mtss_train.model import trunk
from mtss_train.compat import slim, tf
from mtss_train.errors import CheckpointError, MtssError


def readme_graph_block3(checkpoint, images, **restore_kwargs):
    """The released README's recipe: full slim resnet_v2_101, restore the intersection."""
    with tf.Graph().as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            _, end_points = resnet_v2.resnet_v2_101(
                trunk.vgg_preprocess(inputs), is_training=False, scope="resnet_v2_101"
            )
        restore, report = loader.graph_restore_fn(checkpoint, **restore_kwargs)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            restore(sess)
            return sess.run(end_points[trunk.REPRESENTATION], {inputs: images}), report


def assert_same_features(actual, expected):
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual / scale, expected / scale, atol=1e-5)


@pytest.mark.slow
def test_our_checkpoint_restores_the_readme_way_with_identical_block3(tmp_path, images):
    layer = loader.trunk_layer("101")
    # Non-trivial BN statistics, so a restore that skips them would show.
    tf.function(lambda x: layer(x, training=True))(trunk.vgg_preprocess(images))
    expected = layer(trunk.vgg_preprocess(images), training=False)[0].numpy()
    checkpoint_files.save(str(tmp_path), layer.variables_by_name(), step=1)

    features, report = readme_graph_block3(str(tmp_path), images)

    assert_same_features(features, expected)
    assert sorted(report.matched) == sorted(layer.variables_by_name())
    assert report.missing_in_checkpoint and all(
        n.startswith(trunk.NOT_IN_TRUNK) for n in report.missing_in_checkpoint
    )
    assert report.unused_in_checkpoint == [] and report.mismatched == []


@pytest.mark.slow
def test_a_plain_slim_checkpoint_loads_into_the_tf2_extractor(tmp_path, images):
    with tf.Graph().as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            _, end_points = resnet_v2.resnet_v2_101(
                trunk.vgg_preprocess(inputs), is_training=False, scope="resnet_v2_101"
            )
        moving = [v for v in tf.compat.v1.global_variables() if "moving_" in v.op.name]
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            rng = np.random.RandomState(1)
            for v in moving:  # Stand-ins for trained statistics.
                v.load(rng.uniform(0.5, 1.5, v.shape.as_list()), sess)
            expected = sess.run(end_points[trunk.REPRESENTATION], {inputs: images})
            tf.compat.v1.train.Saver().save(sess, str(tmp_path / "slim.ckpt"))

    extractor = loader.load_feature_extractor(str(tmp_path / "slim.ckpt"))

    assert_same_features(extractor(images).numpy(), expected)
    assert len(extractor.report.matched) == 488
    assert extractor.report.missing_in_checkpoint == []
    assert all(n.startswith(trunk.NOT_IN_TRUNK) for n in extractor.report.unused_in_checkpoint)


def test_tiny_round_trip_through_tf1_graph(tmp_path, tiny_trunk, images):
    checkpoint_files.save(str(tmp_path), tiny_trunk.variables_by_name(), step=3)
    with tf.Graph().as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, 64, 64, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            block3, _ = trunk.resnet_v2_101_block3(
                trunk.vgg_preprocess(inputs), False, blocks=trunk.trunk_blocks("tiny")
            )
        restore, report = loader.graph_restore_fn(str(tmp_path))
        with tf.compat.v1.Session() as sess:
            restore(sess)  # No initializer: every variable must come from the checkpoint.
            features = sess.run(block3, {inputs: images})
    assert report.missing_in_checkpoint == []
    assert_same_features(features, tiny_trunk(trunk.vgg_preprocess(images), training=False)[0].numpy())


def test_graph_helper_fails_loudly_when_a_trunk_variable_is_missing(tmp_path, tiny_trunk):
    values = tiny_trunk.variables_by_name()
    dropped = "resnet_v2_101/block2/unit_1/bottleneck_v2/conv2/weights"
    checkpoint_files.save(str(tmp_path), {n: v for n, v in values.items() if n != dropped}, step=1)
    with tf.Graph().as_default():
        with slim.arg_scope(trunk.trunk_arg_scope()):
            trunk.resnet_v2_101_block3(
                tf.zeros([1, 64, 64, 3]), False, blocks=trunk.trunk_blocks("tiny")
            )
        with pytest.raises(CheckpointError, match=dropped):
            loader.graph_restore_fn(str(tmp_path))
        _, report = loader.graph_restore_fn(str(tmp_path), required_scopes=())
        assert report.missing_in_checkpoint == [dropped]


def test_extractor_rejects_a_checkpoint_of_another_trunk_size(tmp_path, tiny_trunk):
    checkpoint_files.save(str(tmp_path), tiny_trunk.variables_by_name(), step=1)
    with pytest.raises(CheckpointError, match="required variable"):
        loader.load_feature_extractor(str(tmp_path), size="101")


def test_extractor_on_tiny_checkpoint_gives_block3(tmp_path, tiny_trunk, images):
    checkpoint_files.save(str(tmp_path), tiny_trunk.variables_by_name(), step=1)
    extractor = loader.load_feature_extractor(str(tmp_path), size="tiny", output_stride=16)
    assert extractor(images.astype(np.uint8)).shape == (2, 4, 4, 128)


@pytest.mark.slow
def test_trunk_detects_the_size_a_checkpoint_holds_and_names_it_when_asked_for_another(tmp_path, tiny_trunk, images):
    checkpoint_files.save(str(tmp_path), tiny_trunk.variables_by_name(), step=1)
    assert loader.detect_trunk_size(str(tmp_path / "model.ckpt-1")) == "tiny"
    model = loader.Trunk(str(tmp_path), loader.TrunkSettings(output_stride=16))
    assert (model.size, model.prefix) == ("tiny", str(tmp_path / "model.ckpt-1"))
    assert model.extractor(images.astype(np.uint8)).shape == (2, 4, 4, 128)
    with pytest.raises(CheckpointError, match=r"it holds the tiny trunk: pass --trunk_size tiny\)$"):
        loader.Trunk(str(tmp_path), loader.TrunkSettings(trunk_size="101")).extractor


def test_trunk_refuses_an_unknown_size_and_a_checkpoint_without_a_trunk(tmp_path):
    with pytest.raises(MtssError, match="--trunk_size must be one of 101, tiny, got '50'"):
        loader.Trunk(loader.RANDOM, loader.TrunkSettings(trunk_size="50"))
    checkpoint_files.save(str(tmp_path), {"rp_head/logits/weights": np.zeros([2], np.float32)}, step=1)
    assert loader.detect_trunk_size(str(tmp_path / "model.ckpt-1")) is None
