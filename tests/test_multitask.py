"""The paper's multi-task machinery: harmonization, the lasso, the all-tasks schedule, smoke settings."""

import json
import os

import numpy as np
import pytest

from conftest import run_cli
from mtss_train.ckpt import checkpoint_files
from mtss_train.model import colorspace, lasso, trunk
from mtss_train.model.slim_layer import SlimLayer
from mtss_train import export, loader
from mtss_train.configs import expand_config, shipped_configs
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig, build_tasks, resolved
from mtss_train.errors import MtssError
from mtss_train.train.trainer import Trainer
from test_settings import parse
from test_train import summary_tags

TESTS = os.path.dirname(__file__)
SMALL_RP = {"batch_size": "8", "patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32"}
LASSO_STEPS = 120


def rp_config(train_dir, **settings) -> TrainConfig:
    defaults = dict(train_dir=str(train_dir), tasks=["rp"], task_params={"rp": SMALL_RP}, trunk_size="tiny",
                    save_every_steps=1000, summary_every_steps=1000, log_every_steps=1000)
    return TrainConfig(**{**defaults, **settings})


@pytest.mark.slow
def test_harmonization_shows_rp_the_lightness_of_colour_patches_and_leaves_other_tasks_alone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    params = {"rp": SMALL_RP, "rotation": {"batch_size": "2"}}
    contrast = {}
    for harmonize in (False, True):
        trainer = Trainer(rp_config(tmp_path, tasks=["rp", "plugin_rotation:Rotation"], task_params=params,
                                    harmonize=harmonize))
        batches = {name: next(it) for name, it in trainer.iterators(trainer.sources, seed=0).items()}
        patches = trainer.model.tasks["rp"].trunk_images(batches["rp"])
        seen = trainer.model.trunk_input("rp", batches["rp"]) + trunk.VGG_MEAN_RGB
        rotation = trainer.model.trunk_input("rotation", batches["rotation"]) + trunk.VGG_MEAN_RGB
        assert float(tf.reduce_max(tf.math.reduce_std(rotation, axis=-1))) > 1.0  # Not harmonized.
        # Per-patch contrast of the lightness of what rp's pipeline made (same seed: same places).
        contrast[harmonize] = np.median(tf.math.reduce_std(colorspace.grey_rgb(patches), axis=[1, 2, 3]))
        if harmonize:
            # The trunk sees L of rp's patches, and those patches kept their colour.
            np.testing.assert_allclose(seen.numpy(), colorspace.grey_rgb(patches).numpy(), atol=1e-3)
            # Colour left (a greyed patch has none): the mean, as grey photos among them give 0.
            assert np.mean(tf.math.reduce_std(patches, axis=-1)) > 2.0
            assert resolved(trainer.config, trainer.tasks)["task_configs"]["rp"]["color"] == "none"
        else:
            np.testing.assert_allclose(seen.numpy(), patches.numpy(), atol=1e-3)
    # Greying a colour-dropped patch kept about a fifth of its contrast; L of the colour patch keeps it all.
    assert contrast[True] > 3 * contrast[False], contrast


def test_harmonization_refuses_rp_colour_dropping_the_user_asked_for(tmp_path):
    config = rp_config(tmp_path, harmonize=True, task_params={"rp": {**SMALL_RP, "color": "drop"}})
    with pytest.raises(MtssError, match=r"--harmonize sets rp.color=none .* drop --task_param rp.color=drop"):
        build_tasks(config)
    assert build_tasks(rp_config(tmp_path, harmonize=True))[0].config.color == "none"
    assert build_tasks(rp_config(tmp_path))[0].config.color == "drop"


def rp_loss(model, batch, training: bool) -> float:
    task = model.tasks["rp"]
    per_example, _ = task.loss(model("rp", batch, training=training), batch)
    return float(tf.reduce_mean(per_example))


@pytest.mark.slow
def test_lasso_loss_feels_the_mix_direction_and_the_penalty_only_its_direction(tmp_path):
    trainer = Trainer(rp_config(tmp_path, lasso=True))
    batch = next(trainer.iterators(trainer.sources, seed=0)["rp"])
    trainer.state.build({"rp": batch})
    alpha = trainer.model.lasso_alphas()["rp"]
    for training in (True, False):
        losses = {}
        for name, values in {"a": [0.1, 0.4, 0.2, 0.3], "2a": [0.2, 0.8, 0.4, 0.6],
                             "reversed": [0.3, 0.2, 0.4, 0.1]}.items():
            alpha.assign(values)
            losses[name] = rp_loss(trainer.model, batch, training)
        # The scale is fixed by construction (the mix divides by ||alpha||_1), also where no
        # batch statistics renormalise it (inference); the direction is not.
        assert losses["2a"] == pytest.approx(losses["a"], rel=1e-5), (training, losses)
        assert abs(losses["reversed"] - losses["a"]) > 1e-3 * losses["a"], (training, losses)
    penalty = lasso.sparsity_penalty
    assert float(penalty(tf.constant([0.1, 0.4, 0.2, 0.3]))) == pytest.approx(float(penalty(tf.constant([0.2, 0.8, 0.4, 0.6]))))
    assert float(penalty(tf.constant([0.0, 3.0, 0.0, 0.0]))) == pytest.approx(1.0)
    assert float(penalty(tf.constant([0.5, -0.5, 0.5, 0.5]))) == pytest.approx(2.0)  # sqrt(units)
    assert float(lasso.top_quarter_share(tf.constant([0.1, -0.6, 0.2, 0.1]))) == pytest.approx(0.6)


@pytest.mark.slow
def test_the_model_reports_its_lasso_and_the_trainer_writes_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    trainer = Trainer(rp_config(tmp_path, tasks=["rp", "plugin_rotation:Rotation"], lasso=True, max_steps=1,
                                summary_every_steps=1, task_params={"rp": SMALL_RP, "rotation": {"batch_size": "2"}}))
    trainer.train()
    assert {"lasso/rp", "lasso/rotation", "lasso/rp/top_quarter_share", "lasso/rotation/top_quarter_share",
            "lasso/alpha_task_by_unit"} <= summary_tags(tmp_path / "logs")
    alphas = trainer.model.lasso_alphas()
    alphas["rp"].assign([0.1, -0.6, 0.2, 0.1])
    alphas["rotation"].assign([0.25] * 4)
    scalars, pictures, histograms = trainer.model.summaries(["rotation", "rp"])
    assert scalars.keys() == {"lasso/rp/top_quarter_share", "lasso/rotation/top_quarter_share"}
    assert float(scalars["lasso/rp/top_quarter_share"]) == pytest.approx(0.6)
    picture = pictures["lasso"]["alpha_task_by_unit"].numpy()
    assert picture.shape == (1, 2 * 16, 4 * 16, 3)
    # A row per task in the order asked, each unit's share scaled by the largest (rp's unit 2).
    np.testing.assert_allclose(picture[0, ::16, ::16, 1], [[0.25 / 0.6] * 4, [1 / 6, 1, 2 / 6, 1 / 6]], rtol=1e-6)
    assert list(histograms) == ["lasso/rotation", "lasso/rp"] and histograms["lasso/rp"] is alphas["rp"]
    plain = Trainer(rp_config(tmp_path / "plain"))
    plain.prepare()
    assert plain.model.summaries(["rp"]) == ({}, {}, {})


def test_lasso_on_images_without_a_static_size_is_a_user_error_naming_the_head():
    network = SlimLayer(trunk.block3_net("tiny", None), name="trunk")

    def head(block3, is_training, end_points):
        with tf.compat.v1.variable_scope("rp_head"):
            return lasso.mix_units(block3, end_points, 0.1)

    head_layer = SlimLayer(head, name="rp_head")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def features(images):
        block3, end_points = network(images, training=False)
        return head_layer(block3, training=False, end_points=end_points)

    with pytest.raises(MtssError, match=r"--lasso needs images of a fixed size, but rp_head gets block3 units of "
                                        r"shape \(None, None, None, 128\)"):
        features(tf.zeros([1, 64, 64, 3]))


@pytest.mark.slow
def test_lasso_penalty_concentrates_the_mix_on_few_depths(tmp_path):
    shares = {}
    for weight in (0.0, 1.0):
        trainer = Trainer(rp_config(tmp_path / str(weight), max_steps=LASSO_STEPS, lasso=True, lasso_l1=weight,
                                    learning_rate=0.01, summary_every_steps=LASSO_STEPS))
        trainer.train()
        shares[weight] = lasso.unit_shares(trainer.model.lasso_alphas()["rp"]).numpy()
    assert len(shares[0.0]) == 4 and np.ptp(shares[0.0]) > 0.02, shares  # The task loss moves the mix.
    assert shares[1.0].max() > 0.8 and shares[1.0].max() > shares[0.0].max() + 0.3, shares  # The penalty selects.
    run_dir = tmp_path / "1.0"
    assert {"lasso/rp", "lasso/rp/top_quarter_share", "lasso/alpha_task_by_unit"} <= summary_tags(run_dir / "logs")
    names = checkpoint_files.read_specs(str(run_dir))
    assert {"rp_head/lasso/alpha", "rp_head/lasso/unit_4/moving_mean"} <= set(names)
    extractor = loader.load_feature_extractor(str(run_dir), size="tiny")  # Plain block3, as released.
    assert not extractor.report.missing_in_checkpoint
    info = export.export_saved_model(str(run_dir), str(tmp_path / "exported"))
    signature = tf.saved_model.load(str(tmp_path / "exported")).signatures["serving_default"]
    assert list(signature.structured_outputs) == ["block3"] and info["max_deviation"] <= export.TOLERANCE


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


def test_smoke_settings_yield_to_the_users_under_either_task_key(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    tasks = ["--tasks", "rp,plugin_rotation:Rotation"]
    config = parse("--smoke", *tasks, "--train_dir", str(tmp_path), "--task_param", "rotation.batch_size=2",
                   "--task_param", "rp.batch_size=2")
    configs = resolved(config, build_tasks(config))["task_configs"]
    assert configs["rotation"]["batch_size"] == 2 and configs["rp"]["batch_size"] == 2
    smoke = parse("--smoke", *tasks, "--train_dir", str(tmp_path))
    assert resolved(smoke, build_tasks(smoke))["task_configs"]["rotation"]["batch_size"] == 8


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_configuration_parses_and_builds_its_tasks(tmp_path, name):
    config = parse("--config", name, "--smoke", "--max_steps", "1", "--train_dir", str(tmp_path))
    config.validate()
    tasks = build_tasks(config)
    assert ",".join(config.tasks) in name.replace("_", ",") and config.trunk_size == "tiny"
    assert [task.name for task in tasks] == config.tasks
    assert config.harmonize == config.lasso == name.endswith("harmonized_lasso")


@pytest.mark.slow
def test_the_shipped_configuration_of_every_task_and_mechanism_trains_a_smoke_step(tmp_path):
    """All four tasks with harmonization and the lasso: every task and mechanism the other
    configurations set (the test above parses and builds each of them), as the command trains."""
    name = "rp_col_ex_ms_harmonized_lasso"
    run = run_cli("mtss_train", "--config", name, "--smoke", "--max_steps", "1", "--train_dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    resolved = json.load(open(tmp_path / "flags.json"))
    assert resolved["tasks"] == ["rp", "col", "ex", "ms"] and resolved["trunk_size"] == "tiny"
    assert resolved["harmonize"] and resolved["lasso"]
    assert checkpoint_files.latest(str(tmp_path)).endswith("model.ckpt-1")


def test_an_unknown_configuration_lists_the_shipped_ones(tmp_path):
    with pytest.raises(MtssError, match=r"--config 'paper' is not a shipped configuration.*rp_col_ex_ms"):
        parse("--config", "paper", "--train_dir", str(tmp_path))


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


# What each task logs and keeps of its head; the trunk restores without any head.
TASK_METRICS = {"rp": ["loss", "accuracy"], "col": ["loss", "accuracy", "ab_error"],
                "ex": ["loss", "retrieval_accuracy", "triplets_meeting_margin"],
                "ms": ["loss", "iou", "pooled_iou", "pixel_accuracy"]}
TASK_PICTURES = ["rp/centre_neighbour", "col/grey_prediction_truth", "ex/views", "ms/frame_predicted_target"]
HEAD_VARIABLES = ["rp_head/fc8/weights", "col_head/logits/weights", "col_head/preact/moving_mean",
                  "ex_head/embed/weights", "ex_head/fc1/weights", "ex_head/preact/moving_mean",
                  "ms_head/logits/weights", "ms_head/preact/moving_mean"]


@pytest.mark.slow
def test_four_tasks_on_the_default_data_each_lower_their_loss_show_their_metrics_and_restore(tmp_path):
    trainer = Trainer(rp_config(tmp_path, tasks=["rp", "col", "ex", "ms"], task_params=SMALL_FOUR, max_steps=240,
                                learning_rate=3e-3, batch_norm_decay=0.9, summary_every_steps=240))
    before = trainer.evaluate(trainer.sources, batches=4)
    trainer.train()
    after = trainer.evaluate(trainer.sources, batches=4)
    for name in ("rp", "col", "ex", "ms"):
        assert after[name]["loss"] < before[name]["loss"], (name, before[name], after[name])
    tags = summary_tags(tmp_path / "logs")
    assert {f"train/{task}/{metric}" for task, metrics in TASK_METRICS.items() for metric in metrics} <= tags
    assert set(TASK_PICTURES) <= tags
    assert set(HEAD_VARIABLES) <= set(checkpoint_files.read_specs(str(tmp_path)))
    extractor = loader.load_feature_extractor(str(tmp_path), size="tiny")
    assert not extractor.report.missing_in_checkpoint
    assert set(HEAD_VARIABLES) <= set(extractor.report.unused_in_checkpoint)
    assert extractor(tf.zeros([1, 64, 64, 3])).shape == (1, 2, 2, 128)


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
