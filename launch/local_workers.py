"""Runs one training job as N synchronous workers on this machine (MultiWorkerMirroredStrategy).

    python launch/local_workers.py --workers 2 -- --tasks rp --smoke --train_dir runs/mw

Everything after `--` goes to `python -m mtss_train` in every worker, with
`--strategy multi_worker` added and TF_CONFIG set for a localhost cluster. Worker 0 is the
chief: it writes checkpoints and summaries, and its output is shown; the others log to
TRAIN_DIR/worker-K.log; each worker's pid is printed at start. If any worker fails, the rest
are stopped and the exit code is the failed worker's. A worker sent SIGTERM or SIGINT is no
failure: the workers agree to stop at the same step, the chief saves it, and each exits
128 + the signal, which is then the launcher's code. On real hosts, set TF_CONFIG per host
the same way (see launch/README.md).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


# Exit codes of a worker that stopped on a signal after the job saved (see mtss_train.__main__).
STOPPED = {128 + s: s for s in (signal.SIGTERM, signal.SIGINT)}
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


def tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


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
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then flags for mtss_train")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    addresses = [f"localhost:{port}" for port in free_ports(args.workers)]
    log_dir = train_dir_of(train_args)
    os.makedirs(log_dir, exist_ok=True)
    workers = []
    for index in range(args.workers):
        env = {**os.environ, "TF_CONFIG": tf_config(addresses, index)}
        command = [sys.executable, "-m", "mtss_train", "--strategy", "multi_worker", *train_args]
        output = None if index == 0 else open(os.path.join(log_dir, f"worker-{index}.log"), "w")
        workers.append(subprocess.Popen(command, env=env, stdout=output, stderr=output))
        log = "its output follows" if output is None else f"log: {output.name}"
        print(f"worker {index}: pid {workers[-1].pid} ({log})", file=sys.stderr, flush=True)
    try:
        return supervise(workers, log_dir)
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches every worker too; a SIGINT to the launcher alone is passed on.
        print("interrupted: the workers stop together at their next stop check and the chief saves; "
              "Ctrl-C again kills them", file=sys.stderr, flush=True)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
        return supervise(workers, log_dir)
    finally:
        # SIGKILL: workers record SIGTERM and keep stepping until the others agree, which
        # the ones that failed never will.
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        for worker in workers:
            worker.wait()


def supervise(workers: list[subprocess.Popen], log_dir: str) -> int:
    """Waits for the workers; returns the job's exit code."""
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
