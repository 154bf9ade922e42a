"""The paper's multi-task machinery: harmonization, the lasso, the all-tasks schedule, smoke settings."""

import glob
import os

import numpy as np
import pytest

from conftest import run_cli
from mtss_train import checkpoints, loader, trunk
from mtss_train.compat import tf
from mtss_train.config import TrainConfig
from mtss_train.trainer import Trainer
from test_train import summary_tags

TESTS = os.path.dirname(__file__)
SMALL_RP = {"batch_size": "8", "patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32"}


def rp_config(train_dir, **settings) -> TrainConfig:
    defaults = dict(train_dir=str(train_dir), tasks=["rp"], task_params={"rp": SMALL_RP}, trunk_size="tiny",
                    save_every_steps=1000, summary_every_steps=1000, log_every_steps=1000)
    return TrainConfig(**{**defaults, **settings})


def test_harmonization_shows_rp_grey_and_leaves_other_tasks_alone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    params = {"rp": SMALL_RP, "rotation": {"batch_size": "2"}}
    for harmonize in (False, True):
        trainer = Trainer(rp_config(tmp_path, tasks=["rp", "plugin_rotation:Rotation"], task_params=params,
                                    harmonize=harmonize))
        batches = {name: next(it) for name, it in trainer.iterators(trainer.sources, seed=0).items()}
        rp = trainer.model.trunk_input("rp", batches["rp"]) + trunk.VGG_MEAN_RGB
        rotation = trainer.model.trunk_input("rotation", batches["rotation"]) + trunk.VGG_MEAN_RGB
        rp_spread = float(tf.reduce_max(tf.math.reduce_std(rp, axis=-1)))
        assert (rp_spread < 1e-3) == harmonize, rp_spread  # Grey: three equal channels.
        assert float(tf.reduce_max(tf.math.reduce_std(rotation, axis=-1))) > 1.0  # Not harmonized.


@pytest.mark.slow
def test_lasso_weights_are_learned_and_the_l1_pulls_them_toward_zero(tmp_path):
    alphas = {}
    for l1 in (0.0, 0.3):
        trainer = Trainer(rp_config(tmp_path / str(l1), max_steps=60, lasso=True, lasso_l1=l1,
                                    learning_rate=0.01, summary_every_steps=60))
        trainer.train()
        alphas[l1] = trainer.model.lasso_alphas()["rp"].numpy()
    units = len(alphas[0.0])
    assert units == 4 and np.ptp(alphas[0.0]) > 0.02  # Learned: the depths are weighted differently.
    assert np.abs(alphas[0.3]).sum() < 0.5 * np.abs(alphas[0.0]).sum(), alphas
    assert np.median(np.abs(alphas[0.3])) < 0.5 / units, alphas  # Most shrink below half their start.
    run_dir = tmp_path / "0.3"
    assert {"lasso/rp", "lasso/alpha_task_by_unit"} <= summary_tags(run_dir / "logs")
    names = checkpoints.read_specs(str(run_dir))
    assert "rp_head/lasso/alpha" in names
    extractor = loader.load_feature_extractor(str(run_dir), size="tiny")  # Plain block3, as released.
    assert not extractor.report.missing_in_checkpoint


@pytest.mark.slow
def test_all_tasks_schedule_trains_every_task_each_step(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    trainer = Trainer(rp_config(tmp_path, tasks=["rp", "plugin_rotation:Rotation"], schedule="all", max_steps=3,
                                task_params={"rp": SMALL_RP, "rotation": {"batch_size": "2"}}))
    head = trainer.model.heads
    trainer.prepare()
    before = {n: h.trainable_variables[0].numpy().copy() for n, h in head.items()}
    trainer.train()
    assert trainer.state.step == 3  # One optimizer step per global step, both tasks in it.
    for name, layer in head.items():
        assert not np.array_equal(layer.trainable_variables[0].numpy(), before[name]), name


@pytest.mark.slow
def test_smoke_settings_yield_to_the_users_under_either_task_key(tmp_path):
    run = run_cli("mtss_train", "--smoke", "--tasks", "rp,plugin_rotation:Rotation", "--max_steps", "1",
                  "--train_dir", str(tmp_path), "--task_param", "rotation.batch_size=2",
                  "--task_param", "rp.batch_size=2", env={**os.environ, "PYTHONPATH": TESTS})
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    configs = json.load(open(tmp_path / "flags.json"))["task_configs"]
    assert configs["rotation"]["batch_size"] == 2 and configs["rp"]["batch_size"] == 2
    assert glob.glob(str(tmp_path / "model.ckpt-1.index"))
