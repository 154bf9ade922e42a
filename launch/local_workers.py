"""Runs one training job as several processes on this machine.

    python launch/local_workers.py --workers 2 -- --tasks rp --smoke --train_dir runs/mw
    python launch/local_workers.py --workers 2 --ps 1 -- --tasks rp,ex --smoke --train_dir runs/ps

Everything after `--` goes to `python -m mtss_train` in every process, with TF_CONFIG set
for a localhost cluster and the strategy added:

- without --ps, N synchronous workers (`--strategy multi_worker`). Worker 0 is the chief:
  it writes checkpoints and summaries. If any worker fails, the rest are stopped and the
  exit code is the failed worker's. A worker sent SIGTERM or SIGINT is no failure: the
  workers agree to stop at the same step, the chief saves it, and each exits 128 + the
  signal, which is then the launcher's code.
- with --ps K, an asynchronous parameter-server job (`--strategy parameter_server`): a
  chief (the coordinator, which trains and writes), N workers and K parameter servers,
  which serve until the launcher stops them when the chief is done. The chief's exit code
  is the job's. A worker killed by a signal is started again (up to 3 times each; the
  chief runs its steps on the others meanwhile); a parameter server that dies, or a
  worker that fails, fails the job.

The chief's output is shown; the others log to TRAIN_DIR/<job>-K.log; every pid is printed
at start. On real hosts, set TF_CONFIG per host the same way (see launch/README.md).
"""

import argparse
import collections
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable


# Exit codes of a worker that stopped on a signal after the job saved (see mtss_train.__main__).
STOPPED = {128 + s: s for s in (signal.SIGTERM, signal.SIGINT)}
# Times a parameter-server job's worker is started again after it died.
WORKER_RESTARTS = 3
# The others follow a stopped worker within a checkpoint write; one that stopped alone (e.g.
# Ctrl-C while starting, before the workers agree on signals) must not leave them waiting.
STOP_GRACE_SECONDS = 300


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(cluster: dict[str, list[str]], index: int, job: str = "worker") -> str:
    """TF_CONFIG of task `index` of `job` in `cluster` ({job: addresses})."""
    return json.dumps({"cluster": cluster, "task": {"type": job, "index": index}})


def cluster_of(workers: int, parameter_servers: int) -> dict[str, list[str]]:
    """{job: localhost addresses on free ports}: workers only, or chief, workers and ps."""
    sizes = {"chief": 1, "worker": workers, "ps": parameter_servers} if parameter_servers else {"worker": workers}
    ports = iter(free_ports(sum(sizes.values())))
    return {job: [f"localhost:{next(ports)}" for _ in range(size)] for job, size in sizes.items()}


def train_dir_of(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg.startswith("--train_dir="):
            return arg.split("=", 1)[1]
        if arg == "--train_dir" and i + 1 < len(args):
            return args[i + 1]
    return "runs/mtss"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ps", type=int, default=0,
                        help="parameter servers; 1 or more runs an asynchronous parameter-server job")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then flags for mtss_train")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    if args.workers < 1 or args.ps < 0:
        parser.error("--workers must be >= 1 and --ps >= 0")
    cluster = cluster_of(args.workers, args.ps)
    strategy = "parameter_server" if args.ps else "multi_worker"
    log_dir = train_dir_of(train_args)
    os.makedirs(log_dir, exist_ok=True)
    processes: dict[str, subprocess.Popen] = {}  # "job index" -> process; the chief first.

    def start(job: str, index: int) -> subprocess.Popen:
        name = f"{job} {index}"
        shown = job == next(iter(cluster)) and index == 0  # The chief (chief 0, or worker 0 without --ps).
        env = {**os.environ, "TF_CONFIG": tf_config(cluster, index, job)}
        command = [sys.executable, "-m", "mtss_train", "--strategy", strategy, *train_args]
        output = None if shown else open(os.path.join(log_dir, f"{job}-{index}.log"), "a")
        processes[name] = subprocess.Popen(command, env=env, stdout=output, stderr=output)
        log = "its output follows" if shown else f"log: {output.name}"
        print(f"{name}: pid {processes[name].pid} ({log})", file=sys.stderr, flush=True)
        return processes[name]

    for job, addresses in cluster.items():
        for index in range(len(addresses)):
            start(job, index)
    supervise = functools.partial(supervise_coordinator, restart=start) if args.ps else supervise_workers
    chief = next(iter(processes.values()))
    try:
        return supervise(processes, log_dir)
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches every process too; a SIGINT to the launcher alone is
        # passed on (parameter servers and their workers keep serving the coordinator).
        print("interrupted: the chief saves and stops (with synchronous workers, all stop together at their "
              "next stop check); Ctrl-C again kills them", file=sys.stderr, flush=True)
        for process in [chief] if args.ps else processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        return supervise(processes, log_dir)
    finally:
        # SIGKILL: synchronous workers record SIGTERM and keep stepping until the others
        # agree, which the ones that failed never will; servers never stop by themselves.
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for process in processes.values():
            process.wait()


def supervise_coordinator(processes: dict[str, subprocess.Popen], log_dir: str,
                          restart: Callable[[str, int], subprocess.Popen]) -> int:
    """Waits for the chief of a parameter-server job; returns its exit code, or that of a
    parameter server or worker that ends first. A worker killed by a signal (an OOM kill, a
    preemption) is started again (`restart`, WORKER_RESTARTS times each), as a cluster
    scheduler would: the chief runs its steps on the other workers meanwhile and takes it
    back when it is up."""
    restarts: collections.Counter = collections.Counter()
    chief = next(iter(processes.values()))
    while True:
        code = chief.poll()
        if code is not None:
            if code in STOPPED:
                print(f"stopped by {STOPPED[code].name}; the same command resumes from the last checkpoint in "
                      f"{log_dir}", file=sys.stderr)
            return code
        for name, server in list(processes.items())[1:]:
            if server.poll() is None:
                continue
            job, index = name.split()
            if job == "worker" and server.returncode < 0 and restarts[name] < WORKER_RESTARTS:
                restarts[name] += 1
                print(f"{name} exited with {server.returncode}; starting it again ({restarts[name]} of "
                      f"{WORKER_RESTARTS}); the chief runs its steps on the other workers meanwhile", file=sys.stderr,
                      flush=True)
                restart(job, int(index))
                continue
            print(f"error: {name} exited with {server.returncode} while the chief trains; stopping the job "
                  f"(logs: {log_dir}/<job>-K.log); the same command resumes from the last checkpoint",
                  file=sys.stderr)
            return server.returncode or 1
        time.sleep(0.5)


def supervise_workers(processes: dict[str, subprocess.Popen], log_dir: str) -> int:
    """Waits for the synchronous workers; returns the job's exit code."""
    workers = list(processes.values())
    first_stop = None
    while True:
        codes = [w.poll() for w in workers]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, *STOPPED)]
        if failed:
            index, code = failed[0]
            print(f"error: worker {index} exited with {code}; stopping the others "
                  f"(logs: {log_dir}/worker-K.log)", file=sys.stderr)
            return code
        if all(c is not None for c in codes):
            stopped = [c for c in codes if c in STOPPED]
            if not stopped:
                return 0
            exits = ", ".join(f"worker {i} exited {c}" for i, c in enumerate(codes))
            print(f"stopped by {STOPPED[max(stopped)].name}: {exits}; the same command resumes from the last "
                  f"checkpoint in {log_dir}", file=sys.stderr)
            return max(stopped)
        if any(c in STOPPED for c in codes):
            first_stop = first_stop or time.monotonic()
            if time.monotonic() - first_stop > STOP_GRACE_SECONDS:
                index, code = next((i, c) for i, c in enumerate(codes) if c in STOPPED)
                print(f"error: worker {index} exited with {code} but others still run after "
                      f"{STOP_GRACE_SECONDS} s; stopping them (logs: {log_dir}/worker-K.log)", file=sys.stderr)
                return code
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
