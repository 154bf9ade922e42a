"""Runs one training job as N synchronous workers on this machine (MultiWorkerMirroredStrategy).

    python launch/local_workers.py --workers 2 -- --tasks rp --smoke --train_dir runs/mw

Everything after `--` goes to `python -m mtss_train` in every worker, with
`--strategy multi_worker` added and TF_CONFIG set for a localhost cluster. Worker 0 is the
chief: it writes checkpoints and summaries, and its output is shown; the others log to
TRAIN_DIR/worker-K.log. If any worker fails, the rest are stopped and the exit code is the
failed worker's. On real hosts, set TF_CONFIG per host the same way (see launch/README.md).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time


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
    try:
        while True:
            codes = [w.poll() for w in workers]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                print(f"error: worker {index} exited with {code}; stopping the others "
                      f"(logs: {log_dir}/worker-K.log)", file=sys.stderr)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.5)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in workers:
            worker.wait()


if __name__ == "__main__":
    sys.exit(main())
