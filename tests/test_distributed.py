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


MIRRORED_ON_TWO_CPUS = """
import sys
from mtss_train import trainer
from mtss_train.compat import tf
from mtss_train.config import TrainConfig
from mtss_train.errors import MtssError

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
trainer.make_strategy = lambda name: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
params = {"patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32"}
try:
    trainer.Trainer(TrainConfig(train_dir=sys.argv[1], tasks=["rp"], trunk_size="tiny",
                                task_params={"rp": {**params, "batch_size": "3"}}))
except MtssError as e:
    print("error:", e)
run = trainer.Trainer(TrainConfig(train_dir=sys.argv[1], tasks=["rp"], trunk_size="tiny", max_steps=2,
                                  task_params={"rp": {**params, "batch_size": "4"}}))
print("replicas", run.strategy.num_replicas_in_sync, "saved", run.train())
"""


def test_a_batch_that_does_not_split_over_the_replicas_is_one_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-c", MIRRORED_ON_TWO_CPUS, str(tmp_path)], capture_output=True,
                         text=True, timeout=600, env=cli_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "error: rp.batch_size 3 does not split over 2 replicas; use a multiple of 2" in run.stdout
    assert f"replicas 2 saved {tmp_path}/model.ckpt-2" in run.stdout
