"""The Task API's hooks (own sources, end points, preprocessing in the model, per-task output
stride) and the trainer's reporting, with test tasks from plugin_hooks.py on a tiny trunk."""

import glob
import os

import cv2
import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files
from mtss_train import loader
from mtss_train.model import trunk
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig
from mtss_train.errors import MtssError
from mtss_train.train.reporting import Meter
from mtss_train.task import task_class
from mtss_train.train.trainer import Trainer
from test_train import summary_tags

TESTS = os.path.dirname(__file__)
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)


@pytest.fixture
def pairs_dir(tmp_path):
    """Six frame/mask pairs (a bright square on noise, its mask) and one corrupt frame."""
    directory = tmp_path / "pairs"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        frame = rng.integers(0, 100, [64, 64, 3], dtype=np.uint8)
        mask = np.zeros([64, 64], np.uint8)
        y, x = rng.integers(0, 32, 2)
        frame[y:y + 32, x:x + 32] = 230
        mask[y:y + 32, x:x + 32] = 255
        cv2.imwrite(str(directory / f"{i}_frame.png"), frame)
        cv2.imwrite(str(directory / f"{i}_mask.png"), mask)
    (directory / "bad_frame.png").write_bytes(b"not a png")
    cv2.imwrite(str(directory / "bad_mask.png"), np.zeros([64, 64], np.uint8))
    return directory


SMALL_RP = {"batch_size": "2", "patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32"}


def config(tmp_path, tasks: list[str], max_steps: int = 4, **task_params: dict) -> TrainConfig:
    """A tiny-trunk run of `tasks` at batch 2; `task_params` adds settings per task name."""
    names = [task_class(spec).name for spec in tasks]
    params = {name: {**(SMALL_RP if name == "rp" else {"batch_size": "2"}), **task_params.get(name, {})}
              for name in names}
    return TrainConfig(train_dir=str(tmp_path / "run"), tasks=tasks, trunk_size="tiny", max_steps=max_steps,
                       task_params=params, save_every_steps=max_steps, summary_every_steps=2, log_every_steps=2)


def test_a_task_with_its_own_source_and_stride_16_trains_beside_rp(tmp_path, pairs_dir):
    trainer = Trainer(config(tmp_path, ["rp", "plugin_hooks:PairedMasks"], max_steps=12,
                             paired={"data": str(pairs_dir)}))
    trainer.train()
    # Six good pairs at batch 2, six steps: every pair met at least once, the bad one once.
    assert trainer.sources["paired"].skipped.count == 1
    assert trainer.sources["rp"].skipped.count == 0 and trainer.sources["rp"] is not trainer.sources["paired"]
    names = checkpoint_files.read_specs(str(tmp_path / "run"))
    trunk_names = {n for n in names if n.startswith(trunk.TRUNK_SCOPE + "/")}
    assert trunk_names == set(loader.trunk_layer("tiny").variables_by_name())  # One trunk, slim names.
    assert "paired_head/logits/weights" in names and "rp_head/fc8/weights" in names
    batch = next(trainer.iterators(trainer.sources, seed=0)["paired"])
    assert trainer.model("paired", batch, training=False)["logits"].shape == (2, 4, 4, 1)  # 64 / 16.
    assert trainer.model.features("rp", next(trainer.iterators(trainer.sources, 0)["rp"]), False)[0].shape[1] == 1
    assert {"data/skipped/paired_pngs", "data/skipped/images", "paired/frame_mask"} <= summary_tags(
        tmp_path / "run" / "logs")


def test_a_head_mixing_block3_units_trains_and_the_trunk_restores_fully(tmp_path):
    trainer = Trainer(config(tmp_path, ["plugin_hooks:UnitMix"], max_steps=3))
    trainer.train()
    mix = trainer.model.heads["unit_mix"].variables_by_name()["unit_mix_head/unit_weights"]
    assert not np.allclose(mix.numpy(), 1.0)  # Learned.
    extractor = loader.load_feature_extractor(str(tmp_path / "run"), size="tiny")
    assert not extractor.report.missing_in_checkpoint and not extractor.report.mismatched
    assert extractor.report.unused_in_checkpoint  # Head, step and optimizer, all outside the trunk.
    assert all(not n.startswith(trunk.TRUNK_SCOPE) for n in extractor.report.unused_in_checkpoint)


def test_rp_loss_is_the_same_with_preprocessing_in_the_model(tmp_path):
    trainer = Trainer(config(tmp_path, ["rp"]))
    batch = next(trainer.iterators(trainer.sources, seed=3)["rp"])
    trainer.prepare({"rp": batch})
    task, model = trainer.model.tasks["rp"], trainer.model
    # The former path: the task subtracted the VGG mean itself and the trunk got the result.
    patches = tf.reshape(batch["patches"], [-1, 32, 32, 3])
    block3, end_points = model.trunk(trunk.vgg_preprocess(patches), training=True)
    before = task.loss(model.heads["rp"](block3, training=True, end_points=end_points, batch=batch), batch)[0]
    after = task.loss(model("rp", batch, training=True), batch)[0]
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-6)
    assert float(tf.reduce_mean(after)) > 0


@pytest.mark.parametrize("tasks", [["rp", "plugin_rotation:Rotation"],
                                   ["rp", "plugin_rotation:Rotation", "plugin_hooks:UnitMix"]])
def test_every_task_shows_its_pictures_at_every_summary_step(tmp_path, tasks):
    Trainer(config(tmp_path, tasks, max_steps=4)).train()
    events = [e for path in glob.glob(str(tmp_path / "run" / "logs" / "events.*"))
              for e in tf.compat.v1.train.summary_iterator(path)]
    pictures = {(v.tag, e.step) for e in events for v in e.summary.value if v.metadata.plugin_data.plugin_name == "images"}
    expected = {"rp/centre_neighbour", "rotation/rotated"} | ({"unit_mix/rotated"} if len(tasks) == 3 else set())
    assert pictures == {(tag, step) for tag in expected for step in (2, 4)}


def test_a_metric_named_loss_is_an_error_naming_the_task(tmp_path):
    with pytest.raises(MtssError, match="task 'loss_named' returns a metric named 'loss'"):
        Trainer(config(tmp_path, ["plugin_hooks:LossNamedMetric"], max_steps=1)).train()


def test_a_second_train_continues_from_the_optimizer_step(tmp_path):
    trainer = Trainer(config(tmp_path, ["rp"], max_steps=2))
    trainer.train()
    trainer.config.max_steps = 3
    assert trainer.train().endswith("model.ckpt-3")
    assert trainer.state.step == 3
    assert int(checkpoint_files.read_tensors(str(tmp_path / "run"), ["global_step"])["global_step"]) == 3


def test_each_task_rate_is_over_its_own_step_time():
    meter = Meter()
    meter.add({"loss": (4.0, 8.0)}, examples=8, seconds=0.5)
    meter.add({"loss": (2.0, 8.0)}, examples=8, seconds=1.5)
    assert meter.examples_per_sec() == pytest.approx(8.0)  # 16 examples in 2 s of its own steps.
    assert meter.means() == {"loss": pytest.approx(6.0 / 16.0)}
