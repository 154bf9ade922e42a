"""The trainer end to end through `python -m mtss_train`: checkpoints, logs, resume, warm start."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_one_line_error, cli_env, run_cli
from test_settings import parse
from mtss_train.ckpt import checkpoint_files
from mtss_train import loader
from mtss_train.model import trunk
from mtss_train.compat import tf
from mtss_train.errors import MtssError, message
from mtss_train.train.config import TrainConfig
from mtss_train.train.reporting import WeightedMeans
from mtss_train.train import trainer as trainer_module
from mtss_train.train.trainer import Trainer

TESTS = os.path.dirname(__file__)
# Small enough for seconds per run on CPU; the tiny trunk comes with --smoke.
FAST = ["--smoke", "--task_param", "rp.batch_size=2", "--log_every_steps", "1"]


def train(train_dir, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("mtss_train", "--train_dir", str(train_dir), *FAST, *flags, env=env)


def global_step(train_dir) -> int:
    return int(checkpoint_files.read_tensors(checkpoint_files.latest(str(train_dir)), ["global_step"])["global_step"])


def summary_tags(log_dir) -> set[str]:
    tags = set()
    for path in glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


@pytest.mark.slow
def test_trains_writes_checkpoints_logs_config_and_resumes(tmp_path):
    as_installed = {k: v for k, v in cli_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = train(tmp_path, "--max_steps", "6", "--save_every_steps", "3", "--summary_every_steps", "3", env=as_installed)
    assert run.returncode == 0, run.stderr
    # A quiet start (mtss_train.startup): our line naming the devices first, none of
    # TensorFlow's C++ start-up lines (such as the cuInit error of a machine without a GPU).
    assert re.search(r"\] training rp from step 0 to 6 on (CPU|GPU):0$", run.stderr.splitlines()[0]), run.stderr[:2000]
    assert not re.search(r"^[IWEF]\d{4} .*\.cc:\d+\]|absl::InitializeLog", run.stderr, re.MULTILINE), run.stderr[:2000]
    assert f"checkpoint:      {tmp_path}/model.ckpt-6" in run.stdout
    assert f"tensorboard --logdir {tmp_path}/logs" in run.stdout
    assert "step 6/6  rp: loss" in run.stderr
    assert global_step(tmp_path) == 6
    names = checkpoint_files.read_specs(str(tmp_path))
    assert "resnet_v2_101/block3/unit_2/bottleneck_v2/conv3/weights" in names
    assert "rp_head/fc8/weights" in names and "rp_head/preact/moving_mean" in names
    assert any(n.startswith("optimizer/") for n in names)
    assert not any(n.startswith(trunk.NOT_IN_TRUNK) for n in names)
    assert {"train/rp/loss", "train/rp/accuracy", "train/rp/examples_per_sec",
            "train/learning_rate", "train/examples_per_sec", "data/skipped/images", "rp/centre_neighbour"} <= summary_tags(tmp_path / "logs")
    extractor = loader.load_feature_extractor(str(tmp_path), size="tiny")  # The bundled loader reads it.
    assert not extractor.report.missing_in_checkpoint and "rp_head/fc8/weights" in extractor.report.unused_in_checkpoint
    assert extractor(tf.zeros([1, 64, 64, 3])).shape == (1, 2, 2, 128)
    flags = json.load(open(tmp_path / "flags.json"))
    assert flags["tasks"] == ["rp"] and flags["trunk_size"] == "tiny"
    assert flags["task_configs"]["rp"]["batch_size"] == 2 and flags["task_configs"]["rp"]["gap"] == 48

    again = train(tmp_path, "--max_steps", "8")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {tmp_path}/model.ckpt-6 at step 6" in again.stderr
    assert "training rp from step 6 to 8" in again.stderr
    assert global_step(tmp_path) == 8


def write_trunk_only_checkpoint(directory) -> dict[str, np.ndarray]:
    """A checkpoint like the released model's: trunk variables only, no step, no heads."""
    layer = loader.trunk_layer("tiny")  # Built: its variables exist.
    values = {name: v.numpy() + 0.5 for name, v in layer.variables_by_name().items()}
    checkpoint_files.save(str(directory), values, step=1)
    return values


@pytest.mark.slow
def test_warm_start_from_a_trunk_only_checkpoint(tmp_path):
    released = write_trunk_only_checkpoint(tmp_path / "released")
    run = train(tmp_path / "run", "--max_steps", "2", "--init_checkpoint", str(tmp_path / "released"),
                "--trainable_scopes", "rp_head")
    assert run.returncode == 0, run.stderr
    assert f"warm start from {tmp_path}/released" in run.stderr
    assert f"{len(released)} matched" in run.stderr and "missing in checkpoint (left at their initial values)" in run.stderr
    trained = checkpoint_files.read_tensors(str(tmp_path / "run"))
    frozen = [n for n in released if not n.endswith(("moving_mean", "moving_variance"))]
    for name in frozen:  # Restored, and --trainable_scopes kept the trunk fixed.
        np.testing.assert_array_equal(trained[name], released[name], err_msg=name)
    assert trained["global_step"] == 2 and "rp_head/fc8/weights" in trained


@pytest.mark.slow
def test_warm_start_that_misses_the_trunk_is_an_error(tmp_path):
    checkpoint_files.save(str(tmp_path / "other"), {"some/other/weights": np.zeros([3])}, step=1)
    with pytest.raises(MtssError, match="lacks.*resnet_v2_101/conv1/"):
        Trainer(parse("--train_dir", str(tmp_path / "run"), *FAST, "--max_steps", "1",
                      "--init_checkpoint", str(tmp_path / "other"))).train()
    assert checkpoint_files.latest(str(tmp_path / "run")) is None


@pytest.mark.slow
def test_a_task_from_a_test_file_trains_by_import_path(tmp_path):
    run = train(tmp_path, "--tasks", "rp,plugin_rotation:Rotation", "--max_steps", "4",
                "--task_param", "rotation.batch_size=2", "--summary_every_steps", "2",
                env=cli_env(PYTHONPATH=TESTS))
    assert run.returncode == 0, run.stderr
    assert "rotation: loss" in run.stderr
    names = checkpoint_files.read_specs(str(tmp_path))
    assert "rotation_head/logits/weights" in names and "rp_head/fc8/weights" in names
    assert {"train/rotation/loss", "rotation/rotated"} <= summary_tags(tmp_path / "logs")
    assert json.load(open(tmp_path / "flags.json"))["task_configs"]["rotation"]["crop_size"] == 64


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    with pytest.raises(MtssError) as raised:
        Trainer(parse("--train_dir", str(tmp_path), *FAST, "--tasks", "rp,plugin_rotation:DivergingRotation",
                      "--max_steps", "6", "--save_every_steps", "1", "--task_param", "diverging.batch_size=2")).train()
    assert "non-finite diverging loss" in message(raised.value) and "\n" not in message(raised.value)
    assert f"last good checkpoint is {tmp_path}/model.ckpt-1" in message(raised.value)
    assert global_step(tmp_path) == 1


@pytest.fixture
def corrupt_dir(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return tmp_path / "corrupt"


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--tasks", "jigsaw"], ["unknown task 'jigsaw'", "known: col, ex, ms, "]),  # Tests may register more.
        (["--tasks", "rp", "--data", "{tmp}"], ["no images", "{tmp}"]),
        (["--data", "{corrupt}"], ["none of the images in the 1 image file(s)", "{corrupt}"]),
        (["--data", "/no/such/photos"], ["/no/such/photos does not exist"]),
        (["--max_steps", "0"], ["--max_steps must be >= 1"]),
        (["--task_param", "rp.batch_size=many"], ["rp.batch_size takes type int, got 'many'"]),
        (["--task_param", "rp.patchsize=64"], ["no setting 'patchsize'", "patch_size"]),
        (["--task_param", "rp_batch_size=4"], ["is not task.field=value"]),
        (["--task_param", "col.batch_size=4"], ["not in --tasks: ['col']"]),
        (["--task_weights", "1,2", "--schedule", "weighted"], ["--task_weights needs one non-negative weight per task (1)"]),
        (["--task_weights", "1"], ["--task_weights needs --schedule weighted"]),
        (["--init_checkpoint", "/no/such/ckpt"], ["/no/such/ckpt"]),
        (["--train_dir", "{file}"], ["cannot create --train_dir"]),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_bad_input_gives_one_clear_error(tmp_path, corrupt_dir, flags, fragments):
    """In this process, as `main` meets them: the flags read as the program reads them, then
    the trainer built and run. How the program prints such an error is the next test's."""
    (tmp_path / "a_file").write_text("")
    fill = lambda s: s.format(tmp=tmp_path / "empty", corrupt=corrupt_dir, file=tmp_path / "a_file" / "run")  # noqa: E731
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtssError) as raised:
        Trainer(parse("--train_dir", str(tmp_path / "run"), "--smoke", *map(fill, flags))).train()
    for fragment in map(fill, fragments):
        assert fragment in message(raised.value)


@pytest.mark.slow
def test_a_bad_input_ends_the_program_with_one_line_and_exit_2(tmp_path):
    for flags, fragment in [(["--data", "/no/such/photos"], "/no/such/photos does not exist"),  # From the trainer.
                            (["extra_argument"], "unexpected arguments ['extra_argument']")]:  # From `main`.
        run = run_cli("mtss_train", "--train_dir", str(tmp_path / "run"), "--smoke", *flags)
        assert_one_line_error(run, fragment)
        assert run.returncode == 2


@pytest.mark.slow
def test_bad_flag_values_are_caught_by_absl(tmp_path):
    run = run_cli("mtss_train", "--train_dir", str(tmp_path), "--schedule", "random")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "--schedule" in run.stderr and "round_robin" in run.stderr


@pytest.mark.slow
def test_rp_beats_chance_on_held_out_pairs(tmp_path):
    """A test-sized run (tiny trunk, 300 steps) learns relative position.

    Evaluated in inference mode on pairs drawn with a seed training never uses. Smaller
    patches than the paper's and no downsampling keep it to a minute or two on CPU; colour
    dropping stays on, so the shortcut it blocks is not what is learned.
    """
    rp = {"batch_size": "32", "patch_size": "48", "gap": "16", "jitter": "3", "color": "drop",
          "downsample_prob": "0", "min_pixels": "20000", "max_pixels": "60000"}
    config = TrainConfig(
        train_dir=str(tmp_path), tasks=["rp"], task_params={"rp": rp}, trunk_size="tiny",
        max_steps=300, learning_rate=1e-3, rmsprop_epsilon=1e-3, batch_norm_decay=0.9,
        save_every_steps=300, summary_every_steps=300,
    )
    trainer = Trainer(config)
    untrained = trainer.evaluate(trainer.sources, batches=20)["rp"]["accuracy"]
    trainer.train()
    trained = trainer.evaluate(trainer.sources, batches=20)["rp"]["accuracy"]
    # Chance is 1/8; over 640 pairs its standard deviation is 1.3 points.
    assert untrained < 0.18 and trained > 0.2, (untrained, trained)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.slow
def test_mixed_precision_keeps_float32_weights_and_checkpoints(tmp_path, precision):
    run = train(tmp_path, "--max_steps", "3", "--precision", precision)
    assert run.returncode == 0, run.stderr
    assert "step 3/3  rp: loss" in run.stderr
    specs = checkpoint_files.read_specs(str(tmp_path))
    assert {str(spec.dtype) for name, spec in specs.items() if name != "global_step"} == {"float32"}
    assert not loader.load_feature_extractor(str(tmp_path), size="tiny").report.mismatched


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_terminated_run_checkpoints_its_current_step_and_resumes(tmp_path, stop_signal):
    command = [sys.executable, "-m", "mtss_train", "--train_dir", str(tmp_path), *FAST,
               "--max_steps", "100000", "--save_every_steps", "1000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.time() + 240
    for line in process.stderr:  # Progress lines, one per step with --log_every_steps 1.
        if "step 3/100000" in line or time.time() > deadline:
            break
    process.send_signal(stop_signal)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + stop_signal, stderr[-2000:]
    saved = global_step(tmp_path)
    assert saved >= 3 and f"{stop_signal.name}: stopped at step {saved} after saving" in stderr
    assert f"model.ckpt-{saved}" in stdout
    if stop_signal == signal.SIGTERM:  # Resumed once: Ctrl-C's checkpoint is saved the same way.
        resumed = train(tmp_path, "--max_steps", str(saved + 1))
        assert resumed.returncode == 0 and f"at step {saved}" in resumed.stderr


def test_only_the_chief_makes_the_eval_pictures(tmp_path, monkeypatch):
    made, picture = [], object()

    def make(kind):  # The makers read their images when called: the other workers never do.
        made.append(kind)
        return picture if kind == "shown" else None  # None: a picture it cannot draw.

    config = TrainConfig(train_dir=str(tmp_path), tasks=["rp"], task_params={"rp": {"batch_size": "2"}}, trunk_size="tiny")
    makers = [lambda: make("shown"), lambda: make("none")]
    assert Trainer(config, eval_picture_makers=makers).eval_pictures == [picture] and made == ["shown", "none"]
    monkeypatch.setattr(trainer_module, "is_chief", lambda strategy: False)
    assert Trainer(config, eval_picture_makers=makers).eval_pictures == [] and made == ["shown", "none"]


@pytest.mark.slow
def test_resume_restores_model_step_and_optimizer_state_exactly(tmp_path):
    config = dict(train_dir=str(tmp_path), tasks=["rp"], task_params={"rp": {"batch_size": "2"}},
                  trunk_size="tiny", save_every_steps=3, summary_every_steps=3)
    Trainer(TrainConfig(max_steps=3, **config)).train()
    saved = checkpoint_files.read_tensors(str(tmp_path))
    resumed = Trainer(TrainConfig(max_steps=5, **config))
    resumed.prepare()  # Builds and restores; does not train.
    state = resumed.state.variables()
    assert set(state) == set(saved)
    assert any(n.startswith("optimizer/") and "/rp_head/" in n for n in state)
    for name, variable in state.items():
        np.testing.assert_array_equal(variable.numpy(), saved[name], err_msg=name)


def test_weighted_means_weigh_every_example_alike_and_leave_out_weightless_metrics():
    means = WeightedMeans()
    means.add({"loss": (4.0, 8.0), "iou": (0.0, 0.0)})  # A batch without any foreground pixel.
    means.add({"loss": (1.0, 2.0), "iou": (1.5, 2.0)})
    assert means.means() == {"loss": pytest.approx(5.0 / 10.0), "iou": pytest.approx(0.75)}
    assert WeightedMeans().means() == {}
    only_empty = WeightedMeans()
    only_empty.add({"iou": (0.0, 0.0)})
    assert only_empty.means() == {}
