"""Evaluation: labelled readers, the linear probe, the feature cache and export, the CLIs."""

import gzip
import json
import os

import cv2
import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files
from mtss_train import loader, recalibrate_bn
from mtss_train.compat import tf
from mtss_train.data.labelled import TFRECORD_LABEL_KEY, fit_square, open_labelled, read_idx
from mtss_train.errors import CheckpointError, DataError
from mtss_train.eval import compare, features as feats, linear_probe as lp
from conftest import assert_one_line_error, run_cli

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array: np.ndarray) -> str:
    """The idx format: 0, 0, type code (0x08 = ubyte), rank, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return str(path)


def stripes(rng, label: int, size: int = 64) -> np.ndarray:
    """An easy 3-class set: horizontal, vertical or diagonal stripes of random period/phase."""
    yy, xx = np.mgrid[:size, :size]
    coord = [yy, xx, yy + xx][label]
    period, phase = rng.uniform(6, 12), rng.uniform(0, 2 * np.pi)
    grey = 127 + 100 * np.sin(2 * np.pi * coord / period + phase) + rng.normal(0, 15, [size, size])
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def write_folders(root, per_class: int, seed: int, classes=("diagonal", "horizontal", "vertical")) -> str:
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(str(root / name / f"{i}.png"), stripes(rng, ["horizontal", "vertical", "diagonal"].index(name)))
    return str(root)


def example(features: dict) -> bytes:
    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})).SerializeToString()


def write_records(path, examples: list[dict]) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for features in examples:
            writer.write(example(features))
    return str(path)


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def stripe_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    return write_folders(root / "train", 30, seed=1), write_folders(root / "test", 15, seed=2)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Like a training checkpoint: the trunk, a head and the step."""
    tf.random.set_seed(7)
    values = dict(loader.trunk_layer("tiny").variables_by_name())
    values.update({"rp_head/fc8/weights": np.ones([4, 8], np.float32), "global_step": np.int64(1)})
    return checkpoint_files.save(str(tmp_path_factory.mktemp("ckpt")), values, step=1)


# Labelled readers.

@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_by_prefix_file_or_directory(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, [5, 28, 28]).astype(np.uint8)
    images[0] = 200  # A flat image stays flat when upscaled.
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.array([3, 1, 4, 1, 5]))
    np.testing.assert_array_equal(read_idx(str(tmp_path / f"train-images-idx3-ubyte{suffix}")), images)
    for path in (tmp_path / "train", tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path):
        data = open_labelled(str(path))
        pairs = list(data.dataset(image_size=40, limit=4).as_numpy_iterator())
        assert data.kind == "idx" and data.count(4) == 4 and [label for _, label in pairs] == [3, 1, 4, 1]
    image = pairs[1][0]
    assert image.shape == (40, 40, 3) and (image[..., 0] == image[..., 2]).all()  # Grey as RGB.
    assert (pairs[0][0] == 200).all()
    np.testing.assert_array_equal(image[..., 0], cv2.resize(images[1], (40, 40), interpolation=cv2.INTER_LINEAR))


def test_bad_idx_files_name_the_problem(tmp_path):
    write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros([5, 4, 4]))
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros([4]))
    with pytest.raises(DataError, match="has 5 images but .* has 4 labels"):
        open_labelled(str(tmp_path / "a"))
    (tmp_path / "b-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + np.array([5, 4, 4], ">u4").tobytes() + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(str(tmp_path / "b-images-idx3-ubyte"))
    (tmp_path / "c-images-idx3-ubyte").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match="is not an idx file"):
        read_idx(str(tmp_path / "c-images-idx3-ubyte"))
    with pytest.raises(DataError, match="no labels file"):
        open_labelled(str(tmp_path / "c-images-idx3-ubyte"))
    with pytest.raises(DataError, match="several idx image files; pass one prefix"):
        open_labelled(str(tmp_path))


def test_class_folders_map_names_to_the_training_labels(tmp_path):
    train = open_labelled(write_folders(tmp_path / "train", 2, seed=0))
    (tmp_path / "test" / "vertical").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "test" / "vertical" / "v.png"), stripes(np.random.default_rng(0), 1))
    (tmp_path / "test" / "vertical" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    test = open_labelled(str(tmp_path / "test"), classes=train.classes)
    assert train.classes == ["diagonal", "horizontal", "vertical"]
    assert sorted(label for _, label in train.dataset(32).as_numpy_iterator()) == [0, 0, 1, 1, 2, 2]
    assert [label for _, label in test.dataset(32).as_numpy_iterator()] == [2]  # Not 0: train's mapping.
    assert test.skipped.count == 1
    assert len({label for _, label in train.dataset(32, limit=4).as_numpy_iterator()}) >= 2  # Mixed order.
    (tmp_path / "test" / "cats").mkdir()
    with pytest.raises(DataError, match="cats in .* not classes of the training data"):
        open_labelled(str(tmp_path / "test"), classes=train.classes)


def test_slim_tfrecords_and_bad_label_formats(tmp_path):
    image = stripes(np.random.default_rng(0), 0, 50)
    (tmp_path / "good").mkdir()
    write_records(tmp_path / "good" / "train.tfrecord-00000-of-00001",
                  [{"image/encoded": png(image), TFRECORD_LABEL_KEY: 7}, {"image/encoded": b"junk", TFRECORD_LABEL_KEY: 2}])
    data = open_labelled(str(tmp_path / "good"))
    pairs = list(data.dataset(32).as_numpy_iterator())
    assert data.kind == "tfrecords" and [label for _, label in pairs] == [7] and data.skipped.count == 1
    np.testing.assert_array_equal(pairs[0][0], fit_square(image, 32))
    no_label = write_records(tmp_path / "a.tfrecord", [{"image/encoded": png(image)}])
    with pytest.raises(DataError, match="int64 'image/class/label'.*found: image/encoded"):
        open_labelled(no_label)
    text_label = write_records(tmp_path / "b.tfrecord", [{"image/encoded": png(image), TFRECORD_LABEL_KEY: b"cat"}])
    with pytest.raises(DataError, match=r"image/class/label \(bytes_list\)"):
        open_labelled(text_label)
    (tmp_path / "c.tfrecord").write_bytes(b"plain text, not records")
    with pytest.raises(DataError, match="not a readable TFRecord file"):
        open_labelled(str(tmp_path / "c.tfrecord"))


# The classifier.

def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=[20, 4]).astype(np.float32), rng.integers(0, 3, 20)
    objective = lp.logistic_objective(x, labels, 3, l2=0.3)
    params = rng.normal(size=15)
    _, grad = objective(params)
    eps = 1e-4
    numeric = [(objective(params + eps * e)[0] - objective(params - eps * e)[0]) / (2 * eps) for e in np.eye(15)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_fit_stops_at_the_minimum_and_says_how_it_stopped():
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=[80, 6]).astype(np.float32), rng.integers(0, 3, 80)
    found = lp.fit(x, labels, 3, l2=0.1, tol=1e-4)
    _, grad = lp.logistic_objective(x, labels, 3, l2=0.1)(found.params())
    # The objective is strictly convex (l2 > 0): a vanishing gradient means its minimum.
    assert found.info["converged"] and found.info["iterations"] > 2
    assert np.abs(grad).max() <= 1e-4 and found.info["grad_max"] == pytest.approx(np.abs(grad).max())
    again = lp.fit(x, labels, 3, l2=0.1, start=found, tol=1e-4)  # A warm start at the minimum stays there.
    assert again.info["converged"] and again.info["iterations"] == 0
    cut = lp.fit(x, labels, 3, l2=0.1, max_iter=2, tol=1e-4)
    assert not cut.info["converged"] and cut.info["iterations"] == 2 and cut.info["loss"] > found.info["loss"]


def test_the_penalty_is_chosen_without_looking_at_test_labels():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=[4, 12])
    labels = rng.integers(0, 4, 300)
    x = (centers[labels] + rng.normal(scale=1.5, size=[300, 12])).astype(np.float32)
    test_x, test_y = x[200:], labels[200:]
    first = lp.probe(x[:200], labels[:200], test_x, test_y, l2_grid=(1.0, 0.1, 0.01, 1e-3), seed=3)
    shuffled = lp.probe(x[:200], labels[:200], test_x, rng.permutation(test_y), l2_grid=(1.0, 0.1, 0.01, 1e-3), seed=3)
    assert first["chosen_l2"] == shuffled["chosen_l2"] and first["val_top1_by_l2"] == shuffled["val_top1_by_l2"]
    assert first["test_top1"] > 0.6 > shuffled["test_top1"]
    assert first["fit_examples"] + first["val_examples"] == 200 and first["top5_k"] == 4
    assert first["test_top5"] == 1.0  # Four classes: every label is in the top 4.


def test_topk_counts_labels_unseen_in_training_as_errors():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert lp.topk_accuracy(logits, np.array([0, 1]), 1) == 0.5
    assert lp.topk_accuracy(logits, np.array([1, -1]), 2) == 0.5


# Features: pooling, cache, export.

def test_grid_pool_uses_adaptive_bins_even_with_more_cells_than_rows():
    block3 = np.arange(2 * 2 * 5 * 3, dtype=np.float32).reshape(2, 2, 5, 3)
    pooled = feats.grid_pool(tf.constant(block3), 3).numpy().reshape(2, 3, 3, 3)
    rows, cols = [(0, 1), (0, 2), (1, 2)], [(0, 2), (1, 4), (3, 5)]  # floor(i*n/3) .. ceil((i+1)*n/3)
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(cols):
            np.testing.assert_allclose(pooled[:, i, j], block3[:, top:bottom, left:right].mean(axis=(1, 2)))
    np.testing.assert_allclose(feats.grid_pool(tf.constant(block3), None), block3.mean(axis=(1, 2)))


def test_random_tiny_trunk_probe_is_far_above_chance(stripe_sets, tmp_path):
    train, test = lp.open_splits(*stripe_sets)
    settings = feats.Settings(trunk_size="tiny", image_size=64, batch_size=32)
    result = lp.run_probe("random", train, test, settings, None, str(tmp_path), l2_grid=(1.0, 0.1, 0.01, 1e-3))
    assert result["classes"] == 3 and result["test_examples"] == 45 and result["feature_shape"] == [3, 3, 128]
    assert result["test_top1"] >= 0.8, result  # Chance is 1/3.


def test_cached_features_are_reused_without_running_the_trunk(tiny_ckpt, stripe_sets, tmp_path, monkeypatch):
    data = open_labelled(stripe_sets[1])
    settings = feats.Settings(image_size=48)
    first = feats.load_or_extract(loader.Trunk(tiny_ckpt, settings), data, settings, 20, str(tmp_path), "test")
    assert loader.Trunk(tiny_ckpt, settings).size == "tiny" and first.features.shape == (20, 9 * 128)

    def no_trunk(self):
        raise AssertionError("the trunk ran on a cache hit")

    monkeypatch.setattr(loader.Trunk, "extractor", property(no_trunk))
    again = feats.load_or_extract(loader.Trunk(tiny_ckpt, settings), data, settings, 20, str(tmp_path), "test")
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.labels, first.labels)
    with pytest.raises(AssertionError, match="trunk ran"):  # Another grid is another key.
        global_settings = feats.Settings(image_size=48, grid=None)
        feats.load_or_extract(loader.Trunk(tiny_ckpt, global_settings), data, global_settings, 20, str(tmp_path), "t")


@pytest.mark.slow
def test_recalibration_reads_only_the_training_images_and_has_its_own_cache_entries(tiny_ckpt, stripe_sets,
                                                                                     tmp_path, monkeypatch):
    train, test = lp.open_splits(*stripe_sets)
    rng = np.random.default_rng(3)
    for name in train.classes:  # Test images whose statistics are nothing like the training images'.
        os.makedirs(tmp_path / "bright" / name)
        for i in range(5):
            bright_noise = rng.integers(200, 256, [64, 64, 3]).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "bright" / name / f"{i}.png"), bright_noise)
    bright = open_labelled(str(tmp_path / "bright"), classes=train.classes)
    settings = feats.Settings(image_size=48, batch_size=16)
    runs = {}
    for name, test_split in (("stripes", test), ("bright", bright)):
        result = lp.run_probe(tiny_ckpt, train, test_split, settings, None, str(tmp_path / name),
                              recalibrate_batches=3, l2_grid=(1.0, 0.01))
        with np.load(result["train_data"]["cache"]) as stored:
            runs[name] = (result, stored["features"])
    assert runs["stripes"][0]["recalibrate_bn"] == {"data": stripe_sets[0], "images": 48, "batches": 3,
                                                    "batch_size": 16, "layers": 18}
    np.testing.assert_array_equal(runs["stripes"][1], runs["bright"][1])  # The test split changed nothing.

    plain = lp.run_probe(tiny_ckpt, train, test, settings, None, str(tmp_path / "stripes"), l2_grid=(1.0, 0.01))
    assert plain["recalibrate_bn"] is None and plain["train_data"]["cache"] != runs["stripes"][0]["train_data"]["cache"]
    with np.load(plain["train_data"]["cache"]) as stored:
        assert not np.allclose(stored["features"], runs["stripes"][1], rtol=1e-3, atol=1e-3)

    def no_recalibration(*args, **kwargs):
        raise AssertionError("recalibrated on a cache hit")

    monkeypatch.setattr(recalibrate_bn, "recalibrate", no_recalibration)
    again = lp.run_probe(tiny_ckpt, train, test, settings, None, str(tmp_path / "stripes"), recalibrate_batches=3,
                         l2_grid=(1.0, 0.01))
    assert again["recalibrate_bn"] == runs["stripes"][0]["recalibrate_bn"]
    assert again["test_top1"] == runs["stripes"][0]["test_top1"]


def test_random_weights_follow_the_seed():
    digests = [loader.Trunk("random", feats.Settings(trunk_size="tiny", seed=s)).digest for s in (0, 0, 1)]
    assert digests[0] == digests[1] != digests[2]


def test_feature_export_formats(tmp_path):
    found = feats.Extracted(np.arange(12, dtype=np.float32).reshape(3, 4), np.array([2, 0, 1]), {"grid": 1})
    feats.export(found, str(tmp_path / "npy"), "npy")
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "features.npy"), found.features)
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "labels.npy"), found.labels)
    feats.export(found, str(tmp_path / "rec"), "tfrecord")
    spec = {"features": tf.io.FixedLenFeature([4], tf.float32), TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
    records = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(tmp_path / "rec" / "features.tfrecord"))]
    np.testing.assert_array_equal(np.stack([r["features"] for r in records]), found.features)
    assert [int(r[TFRECORD_LABEL_KEY]) for r in records] == [2, 0, 1]
    assert json.loads((tmp_path / "rec" / "meta.json").read_text()) == {"grid": 1}


def test_compare_gives_random_the_size_of_the_checkpoints(tiny_ckpt):
    per = compare.settings_per_checkpoint(["random", tiny_ckpt], feats.Settings())
    assert per["random"].trunk_size == per[tiny_ckpt].trunk_size == "tiny"


# The command lines.

@pytest.mark.slow
def test_probe_and_compare_commands(stripe_sets, tiny_ckpt, tmp_path):
    common = ["--train", stripe_sets[0], "--test", stripe_sets[1], "--image_size", "64", "--grid", "global",
              "--l2_grid", "1,0.01", "--cache_dir", str(tmp_path / "cache")]
    result = run_cli("mtss_train.eval.linear_probe", "--checkpoint", "random", "--trunk_size", "tiny",
                     "--out", str(tmp_path / "r.json"), *common)
    assert result.returncode == 0, result.stderr
    probe = json.loads((tmp_path / "r.json").read_text())
    assert probe["grid"] == "global" and probe["feature_shape"] == [128] and probe["test_top1"] > 0.5
    assert "images" in result.stderr and "images/s, ETA" in result.stderr  # The progress line.
    result = run_cli("mtss_train.eval.compare", "random", tiny_ckpt, "--out", str(tmp_path / "c.json"), *common)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("from the cache") == 2  # `random` again: the probe's features.
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["checkpoint", "trunk", "BN", "top-1"] and rows[2].startswith("random ")
    assert rows[3].startswith(tiny_ckpt) and len(json.loads((tmp_path / "c.json").read_text())["results"]) == 2
    assert rows[2].split()[2] == "stored"
    result = run_cli("mtss_train.eval.compare", "random", tiny_ckpt, "--recalibrate_bn", "--recalibrate_batches", "5",
                     "--out", str(tmp_path / "rc.json"), *common)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("BatchNorm statistics of") >= 2 and "from the cache" not in result.stderr
    recalibrated = [r["recalibrate_bn"] for r in json.loads((tmp_path / "rc.json").read_text())["results"]]
    # 90 training images make one batch of 64 (the default --batch_size); the short rest is left out.
    assert [(r["data"], r["images"], r["batches"]) for r in recalibrated] == [(stripe_sets[0], 64, 1)] * 2
    assert [row.split()[2:4] for row in result.stdout.splitlines()[2:4]] == [["recal.", "64"]] * 2


@pytest.mark.slow
def test_bad_data_labels_and_checkpoints_are_user_errors_printed_as_one_line(stripe_sets, tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        lp.open_splits(str(tmp_path / "nowhere"), stripe_sets[1])
    with pytest.raises(CheckpointError, match="nope.ckpt does not exist"):
        loader.Trunk(str(tmp_path / "nope.ckpt"), feats.Settings())
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        compare.settings_per_checkpoint(["random", str(tmp_path)], feats.Settings())
    unlabelled = write_records(tmp_path / "x.tfrecord", [{"image/encoded": b"x", "image/class/text": b"cat"}])
    result = run_cli("mtss_train.eval.linear_probe", "--checkpoint", "random", "--train", unlabelled,
                     "--test", stripe_sets[1], "--cache_dir", "")
    assert_one_line_error(result, "image/class/label", "image/class/text (bytes_list)")


@pytest.mark.slow
def test_fashion_mnist_probe_of_a_random_tiny_trunk(tmp_path):
    if not os.path.isdir(FASHION_MNIST):
        if not os.environ.get("CI"):
            pytest.skip(f"{FASHION_MNIST} missing: apt-get install dataset-fashion-mnist")
        pytest.fail(f"CI is set but {FASHION_MNIST} is missing: .ci/run must apt-get install dataset-fashion-mnist")
    train, test = lp.open_splits(f"{FASHION_MNIST}/train", f"{FASHION_MNIST}/t10k")
    settings = feats.Settings(trunk_size="tiny", image_size=64)
    result = lp.run_probe("random", train, test, settings, 2000, str(tmp_path), l2_grid=(1.0, 0.1, 0.01, 1e-3))
    assert result["classes"] == 10 and result["test_examples"] == 2000
    assert result["test_top1"] > 0.6, result  # Chance is 0.1.


# Pictures of the probe, the comparison and the reproduction (mtss_train.eval.plots).

def test_probe_reports_a_confusion_matrix_and_per_class_accuracy_that_add_up():
    assert lp.confusion_matrix(np.array([0, 1, 1, -1]), np.array([0, 0, 1, 1]), 2).tolist() == [[1, 0], [1, 1]]
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 240)
    x = (np.eye(3)[labels] * 2 + rng.normal(size=[240, 3])).astype(np.float32)
    result = lp.probe(x[:160], labels[:160], x[160:], labels[160:], l2_grid=(0.1,))
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 80 and confusion.sum(axis=1).tolist() == np.bincount(labels[160:]).tolist()
    assert np.trace(confusion) / 80 == pytest.approx(result["test_top1"])
    np.testing.assert_allclose(result["test_top1_per_class"], np.diag(confusion) / confusion.sum(axis=1), atol=1e-5)


def test_probe_pictures_are_written_beside_the_json(tmp_path, monkeypatch):
    from mtss_train.eval import plots
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 120)
    x = (np.eye(3)[labels] + rng.normal(size=[120, 3])).astype(np.float32)
    results = [{**lp.probe(x[:80], labels[:80], x[80:], labels[80:], l2_grid=(0.1,)), "checkpoint": name,
                "test_data": {"data": "stripes"}} for name in ("random", "runs/a/model.ckpt-9")]
    drawn, save = {}, plots.save

    def keep_and_save(figure, path):
        drawn[os.path.basename(path)] = figure
        save(figure, path)

    monkeypatch.setattr(plots, "save", keep_and_save)
    written = lp.write_pictures(results, ["diagonal", "horizontal", "vertical"], str(tmp_path / "r.json"))
    assert written == [str(tmp_path / "r.confusion.png"), str(tmp_path / "r.per_class.png")]
    assert all(cv2.imread(path) is not None for path in written)
    panels = [axes for axes in drawn["r.confusion.png"].axes]
    assert [a.get_title() for a in panels] == [f"random init: top-1 {results[0]['test_top1']:.3f}",
                                                f"a/model.ckpt-9: top-1 {results[1]['test_top1']:.3f}"]
    shown = panels[0].images[0].get_array()
    confusion = np.array(results[0]["confusion"])
    np.testing.assert_allclose(shown, confusion / confusion.sum(axis=1, keepdims=True))  # Rows: share of a class.
    bars = drawn["r.per_class.png"].axes[0].patches
    np.testing.assert_allclose([b.get_height() for b in bars[:3]], results[0]["test_top1_per_class"])
    results[0]["confusion"] = None  # As for more than MAX_CONFUSION_CLASSES classes.
    assert lp.write_pictures(results, None, str(tmp_path / "s.json")) == [str(tmp_path / "s.per_class.png")]


def test_reproduction_chart_has_a_bar_per_arm_and_random_init_as_a_line(tmp_path, monkeypatch):
    from mtss_train.eval import plots, reproduce

    def arm(plain, recalibrated):
        return {"train_seconds": {"0": 1.0, "1": 1.0},
                **{column: {"test_top1_mean": mean, "test_top1_std": 0.01}
                   for column, mean in zip(reproduce.COLUMNS, (plain, recalibrated))}}

    result = {"budget": "budget: 10 steps", "arms": {"random": arm(0.80, 0.78), "rp": arm(0.84, 0.83),
                                                     "rp+ex@schedule=all": arm(0.86, 0.85)}}
    drawn = []
    monkeypatch.setattr(plots, "save", lambda figure, path: drawn.append((figure, path)))
    reproduce.write_chart(result, str(tmp_path / "results.png"))
    (figure, path), = drawn
    axes = figure.axes[0]
    assert path == str(tmp_path / "results.png")
    assert [round(b.get_height(), 4) for b in axes.patches] == [0.84, 0.86, 0.83, 0.85]  # Per column, per arm.
    assert sorted(line.get_ydata()[0] for line in axes.get_lines() if line.get_linestyle() == "--") == [0.78, 0.80]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["rp", "rp+ex\n@schedule=all"]
