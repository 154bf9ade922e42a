"""Several worker processes on localhost train one job with MultiWorkerMirroredStrategy."""

import os
import subprocess
import sys

import pytest

from conftest import cli_env
from mtss_train import checkpoints

LAUNCHER = os.path.join(os.path.dirname(__file__), "..", "launch", "local_workers.py")
pytestmark = pytest.mark.slow


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True,
                          timeout=600, env=cli_env())


def test_two_workers_train_and_the_chief_checkpoints(tmp_path):
    run = launch("--workers", "2", "--", "--smoke", "--train_dir", str(tmp_path), "--max_steps", "4",
                 "--save_every_steps", "2", "--log_every_steps", "1", "--task_param", "rp.batch_size=4")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checkpoint:      {tmp_path}/model.ckpt-4" in run.stdout
    assert "step 4/4  rp: loss" in open(tmp_path / "worker-1.log").read()
    latest = checkpoints.latest(str(tmp_path))
    assert int(checkpoints.read_tensors(latest, ["global_step"])["global_step"]) == 4
    assert "Collective all_reduce" not in run.stderr  # Per-step tf.distribute chatter is muted.


def test_a_failing_worker_stops_the_job(tmp_path):
    run = launch("--workers", "2", "--", "--smoke", "--train_dir", str(tmp_path), "--tasks", "jigsaw")
    assert run.returncode != 0
    assert "unknown task 'jigsaw'" in run.stderr and "exited with 2" in run.stderr
