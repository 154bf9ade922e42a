"""The failures a hostile but realistic user meets, each ending in one clear line or a
recovery, never a traceback, a hang or a silent loss (issue 14).

Runs in-process where the error is an MtssError (the CLI prints those as one line, see
`assert_one_line_error`), and through `python -m mtss_train` where the exit itself is under
test (Ctrl-C, a second run, out of memory, kill -9). The data-level cases (TFRecord keys,
truncation, unreadable files, the pixel cap, libpng noise) are in test_images.py, the
checkpoint-level ones in test_checkpoints.py.
"""

import contextlib
import errno
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterator

import cv2
import numpy as np
import pytest
import skimage.data

from conftest import assert_one_line_error, cli_env, run_cli
from test_images import png_claiming
from test_settings import parse
from mtss_train.ckpt import checkpoint_files
from mtss_train.train.config import TrainConfig, build_tasks
from mtss_train.errors import CheckpointError, DataError, MtssError
from mtss_train.train.train_dir_lock import TrainDirLock
from mtss_train.train.trainer import TaskSchedule, Trainer

FAST = ["--smoke", "--task_param", "rp.batch_size=2", "--log_every_steps", "1"]


def config(train_dir, rp: dict | None = None, **overrides) -> TrainConfig:
    settings = dict(tasks=["rp"], task_params={"rp": {"batch_size": "2", **(rp or {})}}, trunk_size="tiny",
                    max_steps=4, save_every_steps=1, summary_every_steps=1000, log_every_steps=1,
                    batch_norm_decay=0.9)
    return TrainConfig(train_dir=str(train_dir), **{**settings, **overrides})


@contextlib.contextmanager
def absl_logs() -> Iterator[list[logging.LogRecord]]:
    """absl's log records (INFO and up) while in the block."""
    logger, handler, records = logging.getLogger("absl"), logging.Handler(logging.INFO), []
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def messages(records: list[logging.LogRecord], level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two good photos and four bad files of different kinds."""
    root = tmp_path_factory.mktemp("photos")
    for name, image in [("cat.png", skimage.data.chelsea()), ("coffee.jpg", skimage.data.coffee())]:
        cv2.imwrite(str(root / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (root / "half.png").write_bytes((root / "cat.png").read_bytes()[:60_000])
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    os.symlink(root / "moved_away.jpg", root / "gone.jpg")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos):
    """A 4-step run on `photos` with checkpoints at steps 1-4, and its log records."""
    train_dir = tmp_path_factory.mktemp("trained")
    with absl_logs() as logs:
        trainer = Trainer(config(train_dir, data=str(photos)))
        trainer.train()
    return train_dir, logs, trainer.sources["rp"].skipped.count


def copy_of(trained, tmp_path) -> str:
    return str(shutil.copytree(trained[0], tmp_path / "run"))


def test_each_bad_file_is_counted_once_named_once_and_summarised(trained, photos):
    _, logs, skipped = trained
    warnings = messages(logs, logging.WARNING)
    reasons = {"half.png": "truncated PNG", "noise.jpg": "not a decodable image",
               "huge.png": "too many pixels (100000x100000", "gone.jpg": "could not be read (No such file"}
    for name, reason in reasons.items():
        named = [w for w in warnings if w.startswith(f"skipping {photos / name}: ")]
        assert len(named) == 1 and reason in named[0], (name, named)
    assert skipped == 4
    summary = [w for w in warnings if w.startswith(f"inputs skipped in {photos}: 4 skipped: ")]
    assert len(summary) == 1 and all(str(photos / name) in summary[0] for name in reasons)


@pytest.mark.slow
def test_resume_with_other_shapes_names_the_variables_and_the_setting(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    before = sorted(os.listdir(run))
    with pytest.raises(CheckpointError) as error:
        Trainer(config(run, rp={"head_width": "256"}, max_steps=6)).train()
    message = str(error.value)
    assert f"cannot resume from {run}/model.ckpt-4" in message and "\n" not in message
    assert "36 variable(s) differ" in message  # fc6/fc7/reduce weights, BN, and their optimizer slots.
    assert "rp_head/fc6/BatchNorm/beta float32[256] (checkpoint: float32[512])" in message
    assert "--task_param rp.head_width=256 (was 512)" in message
    assert sorted(os.listdir(run)) == before  # Nothing written, nothing re-initialised.
    # A warm start into a new directory may still take what fits and skip the rest.
    with absl_logs() as logs:
        Trainer(config(tmp_path / "warm", rp={"head_width": "256"}, max_steps=1, init_checkpoint=str(run))).train()
    assert any("shape/dtype mismatch" in m and "rp_head/fc6/weights" in m for m in messages(logs))


def damage(run) -> None:
    """Checkpoints 2-4 damaged three ways, plus a stray empty index of a later step."""
    os.truncate(f"{run}/model.ckpt-4.data-00000-of-00001", 1000)
    os.remove(f"{run}/model.ckpt-3.data-00000-of-00001")
    with open(f"{run}/model.ckpt-2.data-00000-of-00001", "r+b") as f:  # Same size, bad checksum.
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    open(f"{run}/model.ckpt-9.index", "w").close()


@pytest.mark.slow
def test_unreadable_newest_checkpoints_fall_back_to_the_newest_readable(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    damage(run)
    with absl_logs() as logs:
        Trainer(config(run, max_steps=3)).train()
    warnings = "\n".join(messages(logs, logging.WARNING))
    for step, why in [(9, "cannot read checkpoint"), (4, "truncated: its data holds 1000 of"),
                      (3, "has no data file"), (2, "Checksum does not match")]:
        assert f"skipping the unreadable checkpoint {run}/model.ckpt-{step}: " in warnings, step
        assert why in warnings
        assert f"moved the unreadable checkpoint {run}/model.ckpt-{step} to {run}/unreadable" in warnings
    assert any(m.startswith(f"resumed from {run}/model.ckpt-1 at step 1") for m in messages(logs))
    assert [os.path.basename(p) for p in checkpoint_files.candidates(run)] == ["model.ckpt-3", "model.ckpt-2", "model.ckpt-1"]
    for prefix in checkpoint_files.candidates(run):  # Every checkpoint left reads whole.
        checkpoint_files.read_tensors(prefix)
    assert checkpoint_files.read_tensors(run, ["global_step"])["global_step"] == 3


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    for step in (1, 2, 3, 4):
        os.truncate(f"{run}/model.ckpt-{step}.data-00000-of-00001", 10)
    with pytest.raises(CheckpointError, match=f"none of the 4 checkpoint.* in --train_dir {run} is readable"):
        Trainer(config(run, max_steps=6)).train()
    assert len(checkpoint_files.candidates(run)) == 4  # Left as they were.


def test_a_head_that_cannot_be_built_names_the_task_and_setting(tmp_path):
    with pytest.raises(MtssError) as error:
        Trainer(config(tmp_path, rp={"head_width": "1"})).train()
    message = str(error.value)
    assert message.startswith("rp failed building the network") and "rp.head_width=1" in message
    assert "filter must not have zero elements" in message and "\n" not in message


@pytest.mark.parametrize("settings, fragment", [
    (dict(learning_rate=float("inf")), "--learning_rate must be finite, got inf"),
    (dict(tasks=["rp", "col"], schedule="weighted", task_weights=[float("inf"), 1.0]), "--task_weights must be finite"),
    (dict(rmsprop_epsilon=float("nan")), "--rmsprop_epsilon must be finite"),
    (dict(task_params={"rp": {"loss_weight": "nan"}}), "rp.loss_weight must be finite, got nan"),
    (dict(task_params={"rp": {"loss_weight": "inf"}}), "rp.loss_weight must be finite, got inf"),
])
def test_non_finite_settings_are_refused_at_start(tmp_path, settings, fragment):
    with pytest.raises(MtssError, match=re.escape(fragment)):
        settings = config(tmp_path, **settings)
        settings.validate()
        build_tasks(settings)


def test_a_schedule_refuses_non_finite_weights():
    with pytest.raises(MtssError, match="must be finite"):
        TaskSchedule(["rp", "col"], "weighted", [float("inf"), 1.0], seed=0)


@pytest.mark.parametrize("where, fragment", [("/no/such/masks", "does not exist"), ("empty", "has no frames/")])
def test_a_missing_or_empty_mask_source_fails_at_start(tmp_path, where, fragment):
    (tmp_path / "empty").mkdir()
    path = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(DataError, match=fragment) as error:
        Trainer(config(tmp_path / "run", tasks=["ms"], task_params={"ms": {"data": path}}))
    assert path in str(error.value)


def test_a_full_disk_at_start_is_one_line_and_keeps_the_checkpoints(trained, tmp_path, monkeypatch):
    run = copy_of(trained, tmp_path)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(run)) and any(m in mode for m in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(MtssError, match=f"cannot write {run}/flags.json: No space left on device"):
        Trainer(config(run, max_steps=6)).train()
    monkeypatch.undo()
    assert [os.path.basename(p) for p in checkpoint_files.candidates(run)][0] == "model.ckpt-4"
    assert not [n for n in os.listdir(run) if ".tmp" in n]


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_fsync = checkpoint_files._fsync

    def fsync(path: str) -> None:  # fsync is where a full disk shows with delayed allocation.
        if "model.ckpt-4.tmp" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(path)

    monkeypatch.setattr(checkpoint_files, "_fsync", fsync)
    with pytest.raises(CheckpointError) as error:
        Trainer(config(tmp_path, save_every_steps=2)).train()
    message = str(error.value)
    assert f"could not write checkpoint {tmp_path}/model.ckpt-4" in message and "No space left on device" in message
    assert f"the previous checkpoint {tmp_path}/model.ckpt-2 is intact" in message and "\n" not in message
    assert checkpoint_files.candidates(str(tmp_path)) == [f"{tmp_path}/model.ckpt-2"]
    assert checkpoint_files.read_tensors(str(tmp_path), ["global_step"])["global_step"] == 2
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@contextlib.contextmanager
def unwritable(directory):
    """`directory` cannot be written: chmod for a user, the immutable flag for root."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield
        finally:
            os.chmod(directory, 0o755)
        return
    try:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
            raise OSError
    except OSError:
        pytest.skip("running as root on a file system without chattr +i: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.slow
def test_a_read_only_train_dir_is_one_line_and_keeps_the_checkpoints(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    with unwritable(run):
        result = run_cli("mtss_train", "--train_dir", str(run), *FAST, "--max_steps", "6", timeout=240)
    assert_one_line_error(result, f"cannot write {run}/flags.json")
    assert result.returncode == 2
    assert checkpoint_files.read_tensors(str(run), ["global_step"])["global_step"] == 4


@pytest.mark.slow
def test_an_input_too_large_for_memory_is_one_line_naming_the_setting(tmp_path):
    # Without colour noise and downsampling the first batch fails on one allocation, not
    # several (TF's allocator waits 10 s for memory before each gives up).
    result = run_cli("mtss_train", "--train_dir", str(tmp_path), *FAST, "--max_steps", "2",
                     "--task_param", "rp.patch_size=100000", "--task_param", "rp.color=none",
                     "--task_param", "rp.downsample_prob=0", timeout=240)
    assert_one_line_error(result, "rp ran out of memory making its first batch", "rp.patch_size=100000")
    assert result.returncode == 2


@pytest.mark.parametrize("flags, fragment", [
    (["--learning_rate", "inf"], "--learning_rate must be finite, got inf"),
    (["--tasks", "rp,col", "--schedule", "weighted", "--task_weights=inf,1"], "--task_weights must be finite"),
])
def test_non_finite_flags_are_refused_at_start(tmp_path, flags, fragment):
    """As `main` reads them (the program prints an MtssError as one line: test_train)."""
    with pytest.raises(MtssError, match=re.escape(fragment)):
        settings = parse("--train_dir", str(tmp_path), *FAST, *flags)
        settings.validate()
        build_tasks(settings)


def start(train_dir, *flags: str, log=None, wrapper: str | None = None) -> subprocess.Popen:
    """`python -m mtss_train` in the background (or `python -c wrapper` with the same flags)."""
    program = ["-c", wrapper] if wrapper else ["-m", "mtss_train"]
    return subprocess.Popen([sys.executable, *program, "--train_dir", str(train_dir), *FAST, *flags],
                            stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, text=True, env=cli_env())


def wait_for(condition, process: subprocess.Popen, timeout: float = 240, poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early with {process.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["importing", "building"])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path, moment):
    process = start(tmp_path, "--max_steps", "3", log=subprocess.PIPE)
    if moment == "importing":
        time.sleep(1.0)  # TensorFlow takes seconds to import.
    else:  # The lock is taken as training starts, before the model is built and traced.
        wait_for(lambda: os.path.exists(tmp_path / "train.lock"), process, poll=0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C) while starting; nothing was saved"


# Ctrl-C while the model is built, as it can come out of TensorFlow: replaced by another
# exception (a half-entered slim variable scope fails to exit: "Improper nesting of
# variable_scope") or swallowed by code that catches everything.
HIDDEN_CTRL_C = """
import signal
from mtss_train import startup  # noqa: F401
from mtss_train.train import state
from mtss_train.__main__ import run

real_build = state.TrainingState.build
def build(self, batches):
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        {handling}
    real_build(self, batches)
state.TrainingState.build = build
run()
"""


@pytest.mark.slow
@pytest.mark.parametrize("handling", ['raise RuntimeError("Improper nesting of variable_scope.")', "pass"],
                         ids=["replaced", "swallowed"])
def test_ctrl_c_that_tensorflow_replaces_or_swallows_is_one_line_and_130(tmp_path, handling):
    process = start(tmp_path, "--max_steps", "3", log=subprocess.PIPE, wrapper=HIDDEN_CTRL_C.format(handling=handling))
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C) while starting; nothing was saved"
    assert checkpoint_files.latest(str(tmp_path)) is None  # Not a step trained, nothing saved.


@pytest.mark.slow
def test_a_second_run_refuses_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    first = start(tmp_path, "--max_steps", "100000", "--save_every_steps", "1000")
    try:
        wait_for(lambda: "pid" in (tmp_path / "train.lock").read_text() if (tmp_path / "train.lock").exists() else False,
                 first)
        second = run_cli("mtss_train", "--train_dir", str(tmp_path), *FAST, "--max_steps", "2", timeout=240)
    finally:
        first.kill()
        first.wait()
    assert_one_line_error(second, f"--train_dir {tmp_path} is in use by another training run (pid {first.pid} on")
    assert (tmp_path / "train.lock").exists()  # Left behind by kill -9, and no obstacle:
    with TrainDirLock(str(tmp_path)):
        with pytest.raises(MtssError, match=f"pid {os.getpid()}"):  # Taken now, by this process.
            TrainDirLock(str(tmp_path)).__enter__()


def test_a_lock_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(MtssError, match=f"cannot write in --train_dir {tmp_path}: No space left on device"):
        TrainDirLock(str(tmp_path)).__enter__()
    monkeypatch.undo()
    with TrainDirLock(str(tmp_path)):  # Nothing held after the failure.
        pass


# The CLI on a slow disk: every fsync of a save waits, so saves are long enough to be
# killed in the middle of.
SLOW_SAVES = """
import time
from mtss_train import startup  # noqa: F401
from mtss_train.ckpt import checkpoint_files
from mtss_train.__main__ import run

real_fsync = checkpoint_files._fsync
def slow_fsync(path):
    time.sleep(0.15)
    real_fsync(path)
checkpoint_files._fsync = slow_fsync
run()
"""


def kill_at_a_random_moment(process, log_path, train_dir, resumed: int, during_save: bool, rng) -> None:
    """Waits for a moment in a step (a few steps in) or in a save (its temporary files exist)."""
    if during_save:
        temporary = f".tmp{process.pid}"
        wait_for(lambda: any(temporary in name for name in os.listdir(train_dir)), process, poll=0.005)
        time.sleep(rng.uniform(0, 0.2))
    else:
        target = resumed + rng.randint(3, 5)  # Past the first save of a fresh run.
        wait_for(lambda: f"step {target}/" in log_path.read_text(), process)
        time.sleep(rng.uniform(0, 0.3))
    process.kill()
    process.wait()


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_within_the_save_interval(tmp_path):
    rng, save_every = random.Random(14), 2
    train_dir, log_path = tmp_path / "run", tmp_path / "log.txt"
    flags = ["--max_steps", "100000", "--save_every_steps", str(save_every), "--keep_checkpoints", "3"]
    last_logged, killed_mid_save = 0, 0
    for kill in range(6):
        had_checkpoint = checkpoint_files.latest(str(train_dir)) is not None
        with open(log_path, "w") as log:
            process = start(train_dir, *flags, log=log, wrapper=SLOW_SAVES)
        try:
            wait_for(lambda: "training rp from step" in log_path.read_text(), process)
            text = log_path.read_text()
            resumed = int(re.search(r"training rp from step (\d+) to", text).group(1))
            assert last_logged - save_every <= resumed <= last_logged, (kill, resumed, last_logged)
            assert not had_checkpoint or f"resumed from {train_dir}/model.ckpt-{resumed} at step {resumed}" in text
            assert "unreadable" not in text and "Traceback" not in text
            kill_at_a_random_moment(process, log_path, train_dir, resumed, kill % 2 == 1, rng)
        finally:
            process.kill()
            process.wait()
        last_logged = max([int(s) for s in re.findall(r"step (\d+)/100000", log_path.read_text())] + [resumed])
        killed_mid_save += any(f".tmp{process.pid}" in name for name in os.listdir(train_dir))
        for prefix in checkpoint_files.candidates(str(train_dir)):  # Every checkpoint left reads whole.
            checkpoint_files.read_tensors(prefix)
    assert killed_mid_save >= 2  # Of the three aimed at saves, most left a save half-written.
    final = run_cli("mtss_train", "--train_dir", str(train_dir), *FAST, "--max_steps", str(last_logged + 1),
                    "--save_every_steps", str(save_every), timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resumed from {train_dir}/model.ckpt-" in final.stderr
    assert checkpoint_files.read_tensors(str(train_dir), ["global_step"])["global_step"] == last_logged + 1
