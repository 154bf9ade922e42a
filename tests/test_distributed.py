"""Several worker processes on localhost training one job with MultiWorkerMirroredStrategy
(MirroredStrategy in one process is test_mirrored)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

from conftest import cli_env
from mtss_train.ckpt import checkpoint_files

LAUNCHER = os.path.join(os.path.dirname(__file__), "..", "launch", "local_workers.py")
sys.path.insert(0, os.path.dirname(LAUNCHER))
import local_workers  # noqa: E402  From launch/, which is scripts, not a package.

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("clusters")]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True,
                          timeout=600, env=cli_env())


def test_two_workers_train_and_the_chief_checkpoints(tmp_path):
    run = launch("--workers", "2", "--", "--smoke", "--train_dir", str(tmp_path), "--max_steps", "4",
                 "--save_every_steps", "2", "--log_every_steps", "1", "--task_param", "rp.batch_size=4")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checkpoint:      {tmp_path}/model.ckpt-4" in run.stdout
    assert "step 4/4  rp: loss" in open(tmp_path / "worker-1.log").read()
    latest = checkpoint_files.latest(str(tmp_path))
    assert int(checkpoint_files.read_tensors(latest, ["global_step"])["global_step"]) == 4
    assert "Collective all_reduce" not in run.stderr  # Per-step tf.distribute chatter is muted.


def test_a_failing_worker_stops_the_job(tmp_path):
    run = launch("--workers", "2", "--", "--smoke", "--train_dir", str(tmp_path), "--tasks", "jigsaw")
    assert run.returncode != 0 and "exited with 2; stopping the others" in run.stderr
    # Said by the worker that exited first: the chief (its output is the launcher's) or worker 1
    # (its log); the launcher may stop the other before it says it too.
    said = run.stderr + (tmp_path / "worker-1.log").read_text()
    assert "unknown task 'jigsaw'" in said, said


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


@contextlib.contextmanager
def launched(out_dir, *args: str) -> Iterator[subprocess.Popen]:
    """The launcher running `args`, its output in out_dir/launcher.{out,err}; killed with its
    workers on the way out, whatever happened."""
    with open(out_dir / "launcher.out", "w") as out, open(out_dir / "launcher.err", "w") as err:
        # Its own session, so its workers form one process group with it.
        launcher = subprocess.Popen([sys.executable, LAUNCHER, *args], stdout=out, stderr=err, env=cli_env(),
                                    start_new_session=True)
    try:
        yield launcher
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()


def progress_steps(log_path) -> list[int]:
    """The steps of the progress lines ('step 7/200  rp: loss ...') in a worker's log so far."""
    with open(log_path) as f:
        return [int(step) for step in re.findall(r"\bstep (\d+)/\d+ ", f.read())]


def saved_step(train_dir) -> int:
    return int(checkpoint_files.read_tensors(checkpoint_files.latest(str(train_dir)), ["global_step"])["global_step"])


@pytest.mark.parametrize("target", [1, 0], ids=["worker", "chief"])
def test_sigterm_to_one_worker_stops_every_worker_at_one_saved_step_and_the_job_resumes(tmp_path, target):
    train_dir = tmp_path / "run"
    settings = ["--smoke", "--train_dir", str(train_dir), "--task_param", "rp.batch_size=4",
                "--log_every_steps", "1", "--stop_check_every_steps", "5", "--save_every_steps", "1000",
                "--summary_every_steps", "1000"]
    logs = [tmp_path / "launcher.err", train_dir / "worker-1.log"]  # The chief's output is the launcher's.
    with launched(tmp_path, "--workers", "2", "--", *settings, "--max_steps", "200") as launcher:
        wait_for(lambda: all(os.path.exists(log) and len(progress_steps(log)) >= 3 for log in logs),
                 "3 steps in both workers' logs")
        pids = {int(i): int(pid) for i, pid in re.findall(r"^worker (\d+): pid (\d+)", open(logs[0]).read(), re.M)}
        os.kill(pids[target], signal.SIGTERM)
        assert launcher.wait(timeout=300) == 143
    saved = saved_step(train_dir)
    assert [progress_steps(log)[-1] for log in logs] == [saved, saved] and saved % 5 == 0 and saved < 200
    stderr = open(logs[0]).read()
    assert "stopped by SIGTERM: worker 0 exited 143, worker 1 exited 143" in stderr, stderr[-3000:]
    for log in logs:
        assert f"SIGTERM (received by 1 of 2 workers): every worker stopped at step {saved}," in open(log).read()
    assert f"checkpoint:      {train_dir}/model.ckpt-{saved}" in open(tmp_path / "launcher.out").read()
    if target == 0:  # Resumed once: a stop a worker received is saved the same way.
        (tmp_path / "resume").mkdir()
        logs[0] = tmp_path / "resume" / "launcher.err"
        resume = ("--workers", "2", "--", *settings, "--max_steps", str(saved + 2))
        with launched(tmp_path / "resume", *resume) as launcher:
            assert launcher.wait(timeout=300) == 0, open(logs[0]).read()[-3000:]
        for log in logs:
            assert f"training rp from step {saved} to {saved + 2}" in open(log).read()
        assert saved_step(train_dir) == saved + 2


VOTES = """
import json, os, signal, time
from mtss_train.compat import tf
from mtss_train.train.distribution import signal_vote

vote = signal_vote(tf.distribute.MultiWorkerMirroredStrategy())
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
rounds = [(0, 0), (signal.SIGINT, 0), (signal.SIGINT, signal.SIGTERM), (0, signal.SIGTERM)]
report = {"votes": [{s.name: n for s, n in vote(mine[index]).items()} for mine in rounds]}
began = time.perf_counter()
for _ in range(200):
    vote(0)
report["seconds_per_vote"] = (time.perf_counter() - began) / 200
print(json.dumps(report))
"""


def test_the_workers_vote_on_the_signals_each_received():
    """Each worker learns how many workers received each signal, whichever it received itself."""
    addresses = [f"localhost:{port}" for port in local_workers.free_ports(2)]
    workers = [subprocess.Popen([sys.executable, "-c", VOTES], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=cli_env(TF_CONFIG=local_workers.tf_config({"worker": addresses}, index)))
               for index in range(2)]
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    reports = []
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.splitlines()[-1]))
    print(json.dumps(reports))
    expected = [{}, {"SIGINT": 1}, {"SIGINT": 1, "SIGTERM": 1}, {"SIGTERM": 1}]
    assert [r["votes"] for r in reports] == [expected, expected]
