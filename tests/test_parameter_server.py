"""Asynchronous parameter-server training on localhost: a coordinator (the chief), two
workers that build and read their own input pipelines, one parameter server."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from conftest import cli_env, run_cli
from mtss_train.ckpt import checkpoint_files
from mtss_train import loader
from mtss_train.data import sample
from mtss_train.errors import MtssError
from mtss_train.train.distribution import parameter_server_cluster
from test_distributed import LAUNCHER, launch, launched, local_workers, progress_steps, saved_step, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("clusters")]

TASK_FLAGS = ("--tasks", "rp,ex", "--smoke", "--log_every_steps", "1", "--task_param", "rp.batch_size=4",
              "--task_param", "ex.batch_size=4")


@pytest.fixture
def photos(tmp_path):
    """The sample photos and one corrupt file, which the workers must skip."""
    directory = tmp_path / "photos"
    directory.mkdir()
    for path in sample.sample_photo_paths():
        shutil.copy(path, directory)
    (directory / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return directory


def head_weights(prefix: str, scope: str) -> dict[str, np.ndarray]:
    names = [n for n in checkpoint_files.read_specs(prefix) if n.startswith(scope) and "/weights" in n]
    return checkpoint_files.read_tensors(prefix, names)


def test_a_parameter_server_job_trains_two_tasks_writes_a_loadable_checkpoint_that_one_process_resumes(tmp_path, photos):
    train_dir = tmp_path / "run"
    run = launch("--workers", "2", "--ps", "1", "--", *TASK_FLAGS, "--data", str(photos), "--train_dir",
                 str(train_dir), "--max_steps", "6", "--save_every_steps", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checkpoint:      {train_dir}/model.ckpt-6" in run.stdout
    assert "training rp, ex from step 0 to 6" in run.stderr
    assert re.search(r"step 6/6  rp: loss [\d.]+ .*  ex: loss [\d.]+", run.stderr)  # A save fetches every step.
    assert "calls Python" not in run.stderr  # The workers decode with TF ops, not the coordinator's Python.
    # Named once, in the coordinator's log, whichever process met it (see the next test).
    assert run.stderr.count(f"skipping {photos / 'broken.jpg'}: not a decodable image") == 1
    assert f"inputs skipped in {photos}: 1 skipped: {photos / 'broken.jpg'}: not a decodable image" in run.stderr

    first, last = (str(train_dir / f"model.ckpt-{step}") for step in (3, 6))
    assert int(checkpoint_files.read_tensors(last, ["global_step"])["global_step"]) == 6
    for scope in ("rp_head/", "ex_head/", "resnet_v2_101/"):  # Both tasks' steps reached the parameter server.
        before, after = head_weights(first, scope), head_weights(last, scope)
        assert before and any(not np.array_equal(before[n], after[n]) for n in before), scope
    features = loader.load_feature_extractor(last, size="tiny")(np.zeros([1, 64, 64, 3], np.uint8))
    assert features.shape[-1] > 0 and np.all(np.isfinite(features))

    # The checkpoint is the same as any strategy's: one process resumes it (a parameter-server
    # job does in the workers-gone test).
    again = run_cli("mtss_train", *TASK_FLAGS, "--data", str(photos), "--train_dir", str(train_dir),
                    "--max_steps", "8", "--save_every_steps", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training rp, ex from step 6 to 8" in again.stderr
    assert int(checkpoint_files.read_tensors(checkpoint_files.latest(str(train_dir)), ["global_step"])["global_step"]) == 8


# A coordinator that never reads its source itself: only the worker's pipeline meets broken.jpg.
REMOTE_READER = """
import json, sys
from mtss_train.compat import tf
from mtss_train.data.images import image_source

strategy = tf.distribute.ParameterServerStrategy(tf.distribute.cluster_resolver.TFConfigClusterResolver())
coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
source = image_source(sys.argv[1], 32)
before = source.skipped.count
shapes = lambda context: source.dataset(tf.constant(3, tf.int64)).map(tf.shape)
iterator = iter(coordinator.create_per_worker_dataset(lambda: strategy.distribute_datasets_from_function(shapes)))
step = tf.function(lambda iterator: next(iterator))
for _ in range(3 * len(source.paths)):  # Three epochs.
    coordinator.schedule(step, args=(iterator,))
coordinator.join()
print(json.dumps({"before": before, "reasons": source.skipped.reasons()}))
"""


def test_the_skips_of_a_pipeline_a_worker_runs_are_counted_in_the_coordinator(tmp_path, photos):
    chief_port, ps_port, worker_port = local_workers.free_ports(3)
    cluster = {"chief": [f"localhost:{chief_port}"], "ps": [f"localhost:{ps_port}"],
               "worker": [f"localhost:{worker_port}"]}
    servers = []
    try:
        for job, port in (("ps", ps_port), ("worker", worker_port)):
            with open(tmp_path / f"{job}.log", "w") as log:
                servers.append(subprocess.Popen(
                    [sys.executable, "-m", "mtss_train", "--strategy", "parameter_server", "--chief_gone_seconds", "5"],
                    stdout=log, stderr=log, env=cli_env(TF_CONFIG=local_workers.tf_config(cluster, 0, job))))
        coordinator = subprocess.run([sys.executable, "-c", REMOTE_READER, str(photos)], capture_output=True, text=True,
                                     timeout=300, env=cli_env(TF_CONFIG=local_workers.tf_config(cluster, 0, "chief")))
    finally:
        for server in servers:
            server.kill()
            server.wait()
    assert coordinator.returncode == 0, coordinator.stderr[-3000:]
    counted = json.loads(coordinator.stdout.strip().splitlines()[-1])
    assert counted == {"before": 0, "reasons": {str(photos / "broken.jpg"): "not a decodable image"}}
    assert "broken.jpg" not in (tmp_path / "worker.log").read_text()  # Named where it is counted.


@pytest.mark.parametrize("target, signum", [("chief", signal.SIGTERM), ("group", signal.SIGINT)],
                         ids=["sigterm-to-the-chief", "ctrl-c-to-every-process"])
def test_a_stop_signal_saves_the_steps_the_coordinator_scheduled(tmp_path, target, signum):
    train_dir = tmp_path / "run"
    args = ("--workers", "2", "--ps", "1", "--", *TASK_FLAGS, "--train_dir", str(train_dir), "--max_steps", "500",
            "--save_every_steps", "500")
    with launched(tmp_path, *args) as launcher:
        err = tmp_path / "launcher.err"
        wait_for(lambda: len(progress_steps(err)) >= 3, "three progress lines")
        if target == "chief":
            os.kill(int(re.search(r"chief 0: pid (\d+)", err.read_text()).group(1)), signum)
        else:  # As Ctrl-C in a terminal: the servers must keep serving while the chief saves.
            os.killpg(launcher.pid, signum)
        assert launcher.wait(timeout=300) == 128 + signum, err.read_text()[-3000:]
    stopped = saved_step(train_dir)
    assert 3 <= stopped < 500
    log = err.read_text()
    name = signal.Signals(signum).name
    assert f"{name}: stopped at step {stopped} after saving" in log and f"stopped by {name}" in log
    # Whole: every tensor reads. It is saved as every checkpoint is, which a parameter-server job
    # resumes (the workers-gone test) and so does one process (the first test).
    checkpoint_files.read_tensors(str(train_dir / f"model.ckpt-{stopped}"))


def test_a_killed_worker_is_started_again_and_the_job_finishes(tmp_path):
    train_dir = tmp_path / "run"
    flags = [*TASK_FLAGS, "--train_dir", str(train_dir), "--max_steps", "100", "--log_every_steps", "10"]
    with launched(tmp_path, "--workers", "2", "--ps", "1", "--", *flags) as launcher:
        err = tmp_path / "launcher.err"
        wait_for(lambda: len(progress_steps(err)) >= 2, "two progress lines")
        os.kill(int(re.search(r"worker 1: pid (\d+)", err.read_text()).group(1)), signal.SIGKILL)
        assert launcher.wait(timeout=600) == 0, err.read_text()[-3000:]
    log = err.read_text()
    assert "worker 1 exited with -9; starting it again (1 of 3)" in log
    assert "Traceback" not in log and progress_steps(err)[-1] == 100
    assert saved_step(train_dir) >= 100  # A step the dead worker ran may have been run again.


def test_a_dead_parameter_server_fails_the_job_naming_it(tmp_path):
    with launched(tmp_path, "--workers", "1", "--ps", "1", "--", *TASK_FLAGS, "--train_dir", str(tmp_path / "run"),
                  "--max_steps", "500") as launcher:
        err = tmp_path / "launcher.err"
        wait_for(lambda: len(progress_steps(err)) >= 1, "a progress line")
        os.kill(int(re.search(r"ps 0: pid (\d+)", err.read_text()).group(1)), signal.SIGKILL)
        assert launcher.wait(timeout=300) != 0
    assert "error: ps 0 exited with -9 while the chief trains; stopping the job" in err.read_text()


def test_a_chief_whose_workers_are_all_gone_gives_up_naming_them_and_the_same_command_resumes(tmp_path):
    chief_port, ps_port, worker_port = local_workers.free_ports(3)
    cluster = {"chief": [f"localhost:{chief_port}"], "ps": [f"localhost:{ps_port}"],
               "worker": [f"localhost:{worker_port}"]}
    train_dir = tmp_path / "run"
    flags = [*TASK_FLAGS, "--train_dir", str(train_dir), "--save_every_steps", "2"]
    processes = {}
    try:
        for job in ("ps", "worker", "chief"):
            with open(tmp_path / f"{job}.log", "w") as log:
                processes[job] = subprocess.Popen(
                    [sys.executable, "-m", "mtss_train", "--strategy", "parameter_server", "--chief_gone_seconds", "5",
                     "--workers_gone_seconds", "5", "--max_steps", "100000", *flags],
                    stdout=log, stderr=log, env=cli_env(TF_CONFIG=local_workers.tf_config(cluster, 0, job)))
        wait_for(lambda: os.path.exists(train_dir / "model.ckpt-2.index") or processes["chief"].poll() is not None,
                 "a checkpoint")
        assert processes["chief"].poll() is None, (tmp_path / "chief.log").read_text()[-3000:]
        processes["worker"].kill()
        assert processes["chief"].wait(timeout=120) == 2
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    saved = saved_step(train_dir)
    last_line = (tmp_path / "chief.log").read_text().strip().splitlines()[-1]
    assert last_line == (f"error: none of the workers localhost:{worker_port} has answered for 5 s; the last checkpoint "
                         f"is {train_dir}/model.ckpt-{saved}; start the workers again and run the same command to resume")
    resumed = launch("--workers", "1", "--ps", "1", "--", *flags, "--max_steps", str(saved + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {saved} to {saved + 2}" in resumed.stderr


def test_without_a_cluster_the_strategy_says_what_it_needs(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(MtssError, match=r"--strategy parameter_server needs TF_CONFIG.*TF_CONFIG is not set.*"
                                        r"launch/local_workers.py --ps 1"):
        parameter_server_cluster()


def test_a_server_leaves_once_its_chief_has_stopped_answering(tmp_path):
    chief = socket.create_server(("localhost", 0))  # Stands in for the coordinator's port.
    ps_port, worker_port = local_workers.free_ports(2)
    cluster = {"chief": [f"localhost:{chief.getsockname()[1]}"], "ps": [f"localhost:{ps_port}"],
               "worker": [f"localhost:{worker_port}"]}
    with open(tmp_path / "ps.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mtss_train", "--strategy", "parameter_server", "--chief_gone_seconds", "3"],
            stdout=log, stderr=log, env=cli_env(TF_CONFIG=local_workers.tf_config(cluster, 0, "ps")))
    try:
        wait_for(lambda: "until the chief at" in (tmp_path / "ps.log").read_text(), "the server to start")
        time.sleep(5)
        assert server.poll() is None, "left while the chief still answered"
        chief.close()
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
        chief.close()
    assert "has not answered for 3 s: leaving" in (tmp_path / "ps.log").read_text()


def test_a_task_whose_pipeline_calls_python_still_trains_with_a_warning(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(4):  # plugin_hooks.PairedMaskSource decodes them with OpenCV in tf.numpy_function.
        assert cv2.imwrite(str(pairs / f"{i}_frame.png"), np.full([64, 64, 3], 40 * i, np.uint8))
        assert cv2.imwrite(str(pairs / f"{i}_mask.png"), np.full([64, 64], 255 * (i % 2), np.uint8))
    tests = os.path.dirname(__file__)
    run = subprocess.run(
        [sys.executable, LAUNCHER, "--workers", "1", "--ps", "1", "--", "--tasks", "plugin_hooks:PairedMasks",
         "--task_param", f"paired.data={pairs}", "--task_param", "paired.batch_size=2", "--trunk_size", "tiny",
         "--max_steps", "2", "--train_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=cli_env(PYTHONPATH=tests))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "the input pipeline of task paired calls Python" in run.stderr
    assert saved_step(tmp_path / "run") == 2
