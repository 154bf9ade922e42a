"""BatchNorm recalibration: exact pooled statistics, a bit-identical copy of everything else,
a checkpoint the loaders restore, and the command line."""

import functools
import gzip
import json
import os
import subprocess

import cv2
import numpy as np
import pytest
from absl import flags
from tf_slim.nets import resnet_v2

from mtss_train.ckpt import checkpoint_files
from mtss_train import loader, recalibrate_bn as rb
from mtss_train.model import trunk
from mtss_train.compat import slim, tf
from mtss_train.errors import CheckpointError, DataError, MtssError, cli_main
from mtss_train.model.slim_layer import SlimLayer
from conftest import assert_one_line_error, run_cli, run_here

SIZE = 64
FIRST_BN = "resnet_v2_101/block1/unit_1/bottleneck_v2/preact"  # Its input (pool1) precedes every BN.


def is_trunk_statistic(name: str) -> bool:
    return name.startswith(trunk.TRUNK_SCOPE + "/") and name.endswith(("/moving_mean", "/moving_variance"))


@pytest.fixture(scope="module")
def trunk_values():
    """A tiny trunk with stored statistics far from any image's (as after multi-task training)."""
    tf.random.set_seed(11)
    values = {n: v.numpy() for n, v in loader.trunk_layer("tiny").variables_by_name().items()}
    rng = np.random.default_rng(11)
    for name in values:
        if is_trunk_statistic(name):
            values[name] = rng.uniform(0.5, 3.0, values[name].shape).astype(np.float32)
    return values


@pytest.fixture(scope="module")
def training_checkpoint(trunk_values, tmp_path_factory):
    """Like the trainer writes: trunk, a head with its own BatchNorm, optimizer slots, the step."""
    rng = np.random.default_rng(12)
    extra = {
        "rp_head/fc8/weights": rng.normal(size=[4, 8]).astype(np.float32),
        "rp_head/preact/moving_mean": rng.normal(size=[8]).astype(np.float32),
        "rp_head/preact/moving_variance": rng.uniform(1, 2, [8]).astype(np.float32),
        "optimizer/resnet_v2_101/conv1/weights/rms": rng.uniform(size=trunk_values["resnet_v2_101/conv1/weights"].shape)
        .astype(np.float32),
        "global_step": np.int64(1500),
    }
    return checkpoint_files.save(str(tmp_path_factory.mktemp("train")), {**trunk_values, **extra}, step=1500)


@pytest.fixture(scope="module")
def image_set() -> np.ndarray:
    """32 RGB images: smooth colour fields plus noise, so statistics differ per channel."""
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    fields = [rng.uniform(0, 255, 3) * (yy[..., None] if i % 2 else xx[..., None]) for i in range(32)]
    return np.clip(np.stack(fields) + rng.normal(0, 30, [32, SIZE, SIZE, 3]), 0, 255).astype(np.uint8)


def batch_moments(values: dict, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN scope -> (mean, variance) of its input over `images` as ONE batch, found independently
    of the module: the TF2 trunk in training mode with moving-average decay 0 stores the
    batch's own moments (variance Bessel-corrected, undone here)."""
    layer = SlimLayer(trunk.block3_net("tiny", batch_norm_decay=0.0), name="independent")
    layer(tf.zeros([1, SIZE, SIZE, 3]), training=False)
    for name, variable in layer.variables_by_name().items():
        variable.assign(values[name])
    _, end_points = layer(trunk.vgg_preprocess(images), training=True)
    found = {}
    for name, variable in layer.variables_by_name().items():
        if name.endswith("/moving_mean"):
            scope = name[: -len("/moving_mean")]
            # The normalised tensor has the shape of its conv's output (preact: of the unit's conv1).
            height, width = end_points[scope.removesuffix("/BatchNorm").replace("/preact", "/conv1")].shape[1:3]
            n = len(images) * height * width
            variance = layer.variables_by_name()[scope + "/moving_variance"].numpy() * (n - 1) / n
            found[scope] = (variable.numpy(), variance)
    return found


def assert_statistics(found: dict, expected: dict[str, tuple[np.ndarray, np.ndarray]], rtol: float) -> None:
    assert {n.rsplit("/", 1)[0] for n in found} == set(expected)
    for scope, (mean, variance) in expected.items():
        scale = np.abs(mean).max()
        np.testing.assert_allclose(found[scope + "/moving_mean"], mean, rtol=rtol, atol=rtol * scale, err_msg=scope)
        np.testing.assert_allclose(found[scope + "/moving_variance"], variance, rtol=rtol, err_msg=scope)


@pytest.mark.slow
def test_one_batch_of_every_image_gives_every_layer_the_statistics_of_its_input(trunk_values, image_set):
    found = rb.recalibrate(trunk_values, image_set, "tiny", batches=1, batch_size=len(image_set))
    assert (found.images, found.batches) == (32, 1)
    assert found.summary()["layers"] == 3 * 6  # preact, conv1 and conv2 BN in each of the tiny trunk's 6 units.
    assert_statistics(found.values, batch_moments(trunk_values, image_set), rtol=2e-5)
    assert not np.allclose(found.values[FIRST_BN + "/moving_variance"], trunk_values[FIRST_BN + "/moving_variance"])


def test_batches_pool_exactly_into_mean_of_means_and_pooled_second_moments(trunk_values, image_set):
    found = rb.recalibrate(trunk_values, image_set, "tiny", batches=4, batch_size=8)
    assert (found.images, found.batches) == (32, 4)
    per_batch = [batch_moments(trunk_values, image_set[i:i + 8]) for i in range(0, 32, 8)]
    expected = {}
    for scope in per_batch[0]:
        means = np.stack([b[scope][0] for b in per_batch]).astype(np.float64)
        squares = np.stack([b[scope][1] + b[scope][0].astype(np.float64) ** 2 for b in per_batch])
        expected[scope] = (means.mean(0), squares.mean(0) - means.mean(0) ** 2)  # E[x^2] - E[x]^2.
    assert_statistics(found.values, expected, rtol=2e-5)
    # The first BN's input depends on no BN: four batches are one batch of all 32 images.
    whole = batch_moments(trunk_values, image_set)[FIRST_BN]
    np.testing.assert_allclose(found.values[FIRST_BN + "/moving_mean"], whole[0], rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(found.values[FIRST_BN + "/moving_variance"], whole[1], rtol=2e-5)


@pytest.mark.slow
def test_a_short_last_batch_is_left_out_and_less_than_a_batch_is_an_error(trunk_values, image_set):
    found = rb.recalibrate(trunk_values, image_set[:30], "tiny", batches=10, batch_size=8)
    np.testing.assert_array_equal(found.values[FIRST_BN + "/moving_mean"],
                                  rb.recalibrate(trunk_values, image_set[:24], "tiny", batches=3,
                                                 batch_size=8).values[FIRST_BN + "/moving_mean"])
    assert (found.images, found.batches) == (24, 3)
    with pytest.raises(DataError, match="only 5 usable image"):
        rb.recalibrate(trunk_values, image_set[:5], "tiny", batches=1, batch_size=8)
    with pytest.raises(CheckpointError, match="lack 1 variable"):
        rb.recalibrate({n: v for n, v in trunk_values.items() if n != "resnet_v2_101/conv1/weights"},
                       image_set, "tiny", batches=1, batch_size=8)


def test_only_the_trunk_statistics_change_and_the_readme_recipe_restores_them(training_checkpoint, trunk_values,
                                                                              image_set, tmp_path):
    found = rb.recalibrate(training_checkpoint, image_set, batches=2, batch_size=16)  # Size detected: tiny.
    written = rb.write_checkpoint(training_checkpoint, found.values, str(tmp_path / "out"))
    assert os.path.basename(written) == "model.ckpt-1500"
    before, after = checkpoint_files.read_tensors(training_checkpoint), checkpoint_files.read_tensors(written)
    assert sorted(before) == sorted(after)
    for name in before:
        if is_trunk_statistic(name):
            np.testing.assert_array_equal(after[name], found.values[name])
            assert after[name].dtype == np.float32 and not np.array_equal(after[name], before[name]), name
        else:  # Weights, the head's own statistics, optimizer slots, the step: bit for bit.
            assert after[name].dtype == before[name].dtype and after[name].tobytes() == before[name].tobytes(), name
    assert sum(map(is_trunk_statistic, before)) == len(found.values) == 2 * found.summary()["layers"]

    with tf.Graph().as_default():  # The released README's recipe, with the trunk the tiny size.
        inputs = tf.compat.v1.placeholder(tf.float32, [None, SIZE, SIZE, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            block3, _ = trunk.resnet_v2_101_block3(trunk.vgg_preprocess(inputs), False,
                                                   blocks=trunk.trunk_blocks("tiny"))
        restore, report = loader.graph_restore_fn(str(tmp_path / "out"))
        with tf.compat.v1.Session() as sess:
            restore(sess)  # No initializer: every trunk variable must come from the checkpoint.
            graph_features = sess.run(block3, {inputs: image_set})
    assert report.missing_in_checkpoint == [] and report.mismatched == []
    extractor = loader.load_feature_extractor(str(tmp_path / "out"), "tiny")
    assert len(extractor.report.matched) == len(report.matched) == len(trunk_values)
    np.testing.assert_allclose(extractor(image_set).numpy(), graph_features, rtol=1e-4, atol=1e-4)
    with pytest.raises(MtssError, match="already holds checkpoint"):  # Never replaces one.
        rb.write_checkpoint(training_checkpoint, found.values, str(tmp_path / "out"))


def write_pngs(directory, images: np.ndarray) -> str:
    os.makedirs(directory, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(os.path.join(directory, f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return str(directory)


def test_images_are_read_from_folders_records_and_idx_files_at_the_probe_size(tmp_path, image_set):
    flat = rb.open_images(write_pngs(tmp_path / "flat", image_set[:3]))
    assert flat.kind == "images" and flat.count() == 3
    first = next(flat.dataset(48).as_numpy_iterator())[0]
    np.testing.assert_array_equal(first, cv2.resize(image_set[0], (48, 48), interpolation=cv2.INTER_AREA))
    with tf.io.TFRecordWriter(str(tmp_path / "unlabelled.tfrecord")) as writer:
        for image in image_set[:2]:
            png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))})).SerializeToString())
    records = list(rb.open_images(str(tmp_path / "unlabelled.tfrecord")).dataset(SIZE).as_numpy_iterator())
    assert len(records) == 2 and all(label == -1 for _, label in records)
    np.testing.assert_array_equal(records[1][0], image_set[1])
    for name, array in (("t-images-idx3-ubyte.gz", np.full([3, 28, 28], 7)), ("t-labels-idx1-ubyte.gz", np.arange(3))):
        with gzip.open(tmp_path / name, "wb") as f:
            header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()  # idx: ubyte, rank, dims.
            f.write(header + array.astype(np.uint8).tobytes())
    idx = rb.open_images(str(tmp_path / "t"))
    assert idx.kind == "idx" and (next(idx.dataset(SIZE).as_numpy_iterator())[0] == 7).all()
    with pytest.raises(DataError, match="does not exist"):
        rb.open_images(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_command_line_recalibrates_with_a_progress_line(training_checkpoint, image_set, tmp_path):
    data = write_pngs(tmp_path / "photos", image_set[:20])
    out = tmp_path / "recalibrated"
    result = run_cli("mtss_train.recalibrate_bn", "--checkpoint", os.path.dirname(training_checkpoint),
                     "--data", data, "--out", str(out), "--batches", "2", "--batch_size", "8",
                     "--image_size", str(SIZE))
    assert result.returncode == 0, result.stderr
    assert "BatchNorm statistics of" in result.stderr and "images/s" in result.stderr and "ETA" in result.stderr
    written = result.stdout.strip().splitlines()[-1]
    assert written == str(out / "model.ckpt-1500") and checkpoint_files.latest(str(out)) == written
    provenance = json.loads((out / rb.PROVENANCE_FILE).read_text())
    assert provenance["images"] == 16 and provenance["batches"] == 2 and provenance["trunk_size"] == "tiny"
    # The same images in the same order as the library reads them.
    expected = rb.recalibrate(training_checkpoint, rb.open_images(data).dataset(SIZE), batches=2, batch_size=8)
    stored = checkpoint_files.read_tensors(written, list(expected.values))
    for name, value in expected.values.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)


def recalibrate_here(capfd, *argv: str) -> subprocess.CompletedProcess:
    """`python -m mtss_train.recalibrate_bn ARGV` run in this process, ended as the program ends."""
    values = flags.FlagValues()
    rb.define_flags(values)
    return run_here(capfd, lambda: cli_main(functools.partial(rb.main, values=values))(values(["recalibrate_bn", *argv])),
                    argv)


@pytest.mark.slow
def test_command_line_errors_are_one_line(training_checkpoint, image_set, tmp_path, capfd):
    ckpt = os.path.dirname(training_checkpoint)
    photos = write_pngs(tmp_path / "photos", image_set[:3])
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "taken").mkdir()
    checkpoint_files.save(str(tmp_path / "taken"), {"x": np.zeros(1, np.float32)}, step=1)
    cases = [
        (["--checkpoint", str(tmp_path / "none.ckpt"), "--data", photos], ["none.ckpt", "does not exist"]),
        (["--checkpoint", str(tmp_path / "notes.txt"), "--data", photos], ["notes.txt", "not a checkpoint"]),
        (["--checkpoint", ckpt, "--data", str(tmp_path / "nodata")], ["nodata", "does not exist"]),
        (["--checkpoint", ckpt, "--data", str(tmp_path / "broken")], ["broken", "no usable image", "3 undecodable"]),
        (["--checkpoint", ckpt, "--data", photos, "--batch_size", "4"], ["only 3 usable image", "batch of 4"]),
        (["--checkpoint", ckpt, "--data", photos, "--out", str(tmp_path / "taken")], ["taken", "already holds"]),
        (["--checkpoint", ckpt, "--data", photos, "--trunk_size", "101"], ["--trunk_size tiny"]),
        (["--checkpoint", ckpt, "--data", photos, "--batches", "0"], ["--batches must be positive"]),
    ]
    for i, (args, fragments) in enumerate(cases):
        argv = [*args, *([] if "--out" in args else ["--out", str(tmp_path / "out")]), "--image_size", "32"]
        if i == 0:  # As the program ends, in a process of its own: one line, exit 2, no traceback.
            assert_one_line_error(run_cli("mtss_train.recalibrate_bn", *argv), *fragments)
        assert_one_line_error(recalibrate_here(capfd, *argv), *fragments)
    assert not (tmp_path / "out").exists() or checkpoint_files.latest(str(tmp_path / "out")) is None


@pytest.mark.slow
def test_the_101_recalibrated_restores_488_of_488_the_readme_way(tmp_path, images):
    tf.random.set_seed(5)
    layer = loader.trunk_layer("101")
    values = {n: v.numpy() for n, v in layer.variables_by_name().items()}
    source = checkpoint_files.save(str(tmp_path / "source"), values, step=7)
    found = rb.recalibrate(source, images, batches=1, batch_size=2)  # Two 64 px images: cheap.
    written = rb.write_checkpoint(source, found.values, str(tmp_path / "out"))
    assert len(found.values) == 2 * sum(n.endswith("/moving_mean") for n in values)
    with tf.Graph().as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            resnet_v2.resnet_v2_101(trunk.vgg_preprocess(inputs), is_training=False, scope="resnet_v2_101")
        _, report = loader.graph_restore_fn(written)
    assert len(report.matched) == len(values) == 488
    assert report.unused_in_checkpoint == [] and report.mismatched == []
    assert all(n.startswith(trunk.NOT_IN_TRUNK) for n in report.missing_in_checkpoint)
