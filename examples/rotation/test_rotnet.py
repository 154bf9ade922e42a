"""Tests of the rotation task: its examples, its loss, and a short run beside rp.

Run them with `python -m pytest examples/rotation` (tests/test_docs.py runs them too).
"""

import json
import os

import numpy as np
import pytest

from mtss_train.compat import tf

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    """Puts this folder on sys.path, as `PYTHONPATH=examples/rotation` does for the CLI."""
    monkeypatch.syspath_prepend(HERE)


def photos(count: int = 3) -> tf.data.Dataset:
    """Endless random RGB photos, uint8 [H, W, 3], as the shared image source gives them."""
    pixels = np.random.RandomState(0).randint(0, 256, [count, 80, 100, 3]).astype(np.uint8)
    return tf.data.Dataset.from_tensor_slices(pixels).repeat()


def summary_tags(logdir) -> set[str]:
    """Every tag written to the TensorBoard event files under `logdir`."""
    tags = set()
    for path in tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def rotnet(**settings: str):
    from mtss_train.task import make_config
    from rotnet import RotNet

    return RotNet(make_config(RotNet, {"crop_size": "32", **settings}))


# --8<-- [start:test_pipeline]
def test_each_crop_comes_in_all_four_orientations():
    batch = next(iter(rotnet().make_dataset(photos(), batch_size=2, seed=0)))
    turned = batch["turned"].numpy()
    assert turned.shape == (2, 4, 32, 32, 3)
    np.testing.assert_array_equal(batch["label"], [[0, 1, 2, 3]] * 2)
    for k in range(4):
        np.testing.assert_array_equal(turned[:, k], tf.image.rot90(turned[:, 0], k))


def test_a_tensor_seed_makes_the_same_examples_as_the_same_int():
    task = rotnet()
    as_int = next(iter(task.make_dataset(photos(), 2, seed=7)))["turned"]
    as_tensor = next(iter(task.make_dataset(photos(), 2, seed=tf.constant(7, tf.int64))))["turned"]
    np.testing.assert_array_equal(as_int, as_tensor)
# --8<-- [end:test_pipeline]


def test_loss_and_metrics_reward_the_right_turn():
    task = rotnet()
    labels = tf.constant([[0, 1, 2, 3]])
    right = {"logits": 10.0 * tf.one_hot(labels, 4)}
    one_wrong = {"logits": 10.0 * tf.one_hot([[0, 1, 2, 0]], 4)}
    loss, metrics = task.loss(right, {"label": labels})
    assert loss.shape == [1] and float(loss[0]) < 1e-3
    assert float(metrics["accuracy"][0]) == float(metrics["all_four_right"][0]) == 1.0
    _, metrics = task.loss(one_wrong, {"label": labels})
    assert float(metrics["accuracy"][0]) == 0.75 and float(metrics["all_four_right"][0]) == 0.0


def test_a_bad_setting_is_one_error_naming_it():
    from mtss_train.errors import MtssError

    with pytest.raises(MtssError, match="rotnet.min_crop_fraction"):
        rotnet(min_crop_fraction="1.5")


# --8<-- [start:test_training]
def test_trains_beside_rp_and_its_checkpoint_loads(tmp_path):
    from mtss_train.ckpt import checkpoint_files
    from mtss_train.loader import load_feature_extractor
    from mtss_train.train.config import TrainConfig
    from mtss_train.train.trainer import Trainer

    small_rp = {"batch_size": "4", "patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32"}
    config = TrainConfig(
        train_dir=str(tmp_path), tasks=["rp", "rotnet:RotNet"], trunk_size="tiny", max_steps=2,
        task_params={"rp": small_rp, "rotnet": {"batch_size": "2", "crop_size": "32", "head_width": "16"}},
        save_every_steps=2, summary_every_steps=1, log_every_steps=1)
    last = Trainer(config).train()

    names = checkpoint_files.read_specs(last)
    assert any(name.startswith("rotnet_head/hidden/") for name in names)  # Our head, by its scope.
    assert any(name.startswith("rp_head/") for name in names)
    settings = json.load(open(tmp_path / "flags.json"))["task_configs"]["rotnet"]
    assert settings["crop_size"] == 32 and settings["head_width"] == 16
    # The trunk it shaped loads like any other: 4 images in, block3 features out.
    features = load_feature_extractor(str(tmp_path), size="tiny")(np.zeros([4, 64, 64, 3], np.float32))
    assert features.shape[0] == 4 and len(features.shape) == 4
    assert "rotnet/orientations" in summary_tags(tmp_path / "logs")  # Our TensorBoard pictures.
# --8<-- [end:test_training]


def test_the_entry_point_registers_the_short_name(tmp_path, monkeypatch):
    from mtss_train.registry import load_entry_point
    from mtss_train.task import TASKS, task_class

    # What `pip install -e examples/rotation` leaves in site-packages, reduced to the entry point.
    dist = tmp_path / "mtss_rotnet-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mtss-rotnet\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[mtss_train.tasks]\nrotnet = rotnet:RotNet\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_entry_point(TASKS, "rotnet")
    assert task_class("rotnet") is task_class("rotnet:RotNet")
