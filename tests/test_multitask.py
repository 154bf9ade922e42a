"""The paper's multi-task machinery: harmonization, the lasso, the all-tasks schedule, smoke settings."""

import glob
import json
import os

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from mtss_train import checkpoints, loader, trunk
from mtss_train.configs import expand_config, shipped_configs
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
    configs = json.load(open(tmp_path / "flags.json"))["task_configs"]
    assert configs["rotation"]["batch_size"] == 2 and configs["rp"]["batch_size"] == 2
    assert glob.glob(str(tmp_path / "model.ckpt-1.index"))


@pytest.mark.slow
@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_configuration_parses_and_trains_a_smoke_step(tmp_path, name):
    run = run_cli("mtss_train", "--config", name, "--smoke", "--max_steps", "1", "--train_dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    resolved = json.load(open(tmp_path / "flags.json"))
    assert ",".join(resolved["tasks"]) in name.replace("_", ",") and resolved["trunk_size"] == "tiny"
    assert resolved["harmonize"] == resolved["lasso"] == name.endswith("harmonized_lasso")
    assert checkpoints.latest(str(tmp_path)).endswith("model.ckpt-1")


def test_an_unknown_configuration_lists_the_shipped_ones(tmp_path):
    run = run_cli("mtss_train", "--config", "paper", "--train_dir", str(tmp_path))
    assert_one_line_error(run, "--config 'paper' is not a shipped configuration", "rp_col_ex_ms")


def test_flags_beside_a_configuration_override_it(tmp_path):
    argv = expand_config(["mtss_train", "--tasks=rp", "--config=ex", "--smoke"])
    assert argv[1].startswith("--flagfile=") and argv[1].endswith("configs/ex.flags")
    assert argv[2:] == ["--tasks=rp", "--config=ex", "--smoke"]  # Later flags win in absl.


# Small inputs keep the four-task runs to seconds per step on CPU; the code path is the full one.
SMALL_FOUR = {"rp": SMALL_RP, "col": {"batch_size": "8", "crop": "64", "resize_side": "96"},
              # infonce: its loss falls as views separate (the default "all" mining averages over the
              # triplets still violating the margin, which can rise while fewer violate); milder
              # colour jitter than Dosovitskiy's, which a tiny trunk learns too slowly for a test.
              "ex": {"batch_size": "8", "crop_size": "48", "loss": "infonce", "sv_power": "1.5", "pca_factor": "1.5"},
              "ms": {"batch_size": "8", "crop": "64"}}


@pytest.mark.slow
def test_four_tasks_on_the_default_data_each_lower_their_loss(tmp_path):
    trainer = Trainer(rp_config(tmp_path, tasks=["rp", "col", "ex", "ms"], task_params=SMALL_FOUR, max_steps=240,
                                learning_rate=3e-3, batch_norm_decay=0.9, summary_every_steps=240))
    before = trainer.evaluate(trainer.sources, batches=4)
    trainer.train()
    after = trainer.evaluate(trainer.sources, batches=4)
    for name in ("rp", "col", "ex", "ms"):
        assert after[name]["loss"] < before[name]["loss"], (name, before[name], after[name])
    tags = summary_tags(tmp_path / "logs")
    assert {"rp/centre_neighbour", "col/grey_prediction_truth", "ex/views", "ms/frame_predicted_target"} <= tags
    assert not loader.load_feature_extractor(str(tmp_path), size="tiny").report.missing_in_checkpoint


@pytest.mark.slow
def test_four_tasks_on_the_real_101_trunk_restore_the_readme_way(tmp_path):
    from test_loader import assert_same_features, readme_graph_block3

    params = {name: {**settings, "batch_size": "2"} for name, settings in SMALL_FOUR.items()}
    trainer = Trainer(rp_config(tmp_path, tasks=["rp", "col", "ex", "ms"], task_params=params, trunk_size="101",
                                max_steps=4, harmonize=True, lasso=True))
    trainer.train()
    images = np.random.RandomState(0).uniform(0, 255, [2, 64, 64, 3]).astype(np.float32)
    features, report = readme_graph_block3(str(tmp_path), images)
    expected = loader.load_feature_extractor(str(tmp_path))(images).numpy()
    assert_same_features(features, expected)
    assert all(n.startswith(trunk.NOT_IN_TRUNK) for n in report.missing_in_checkpoint)
    assert {f"{t}_head/lasso/alpha" for t in ("rp", "col", "ex", "ms")} <= set(report.unused_in_checkpoint)
