"""The tf.distribute strategy of a run and each process's role in it."""

import json
import os
import signal
import socket
import threading
import time
from typing import Callable

import numpy as np
from absl import logging

from mtss_train.compat import tf
from mtss_train.errors import MtssError
from mtss_train.log_levels import quieted

# The jobs of a parameter-server cluster: the coordinator runs the trainer, the others serve.
PS_JOBS = ("chief", "worker", "ps")
PS_LAUNCH_HINT = "launch/local_workers.py --ps 1 sets one up on this machine; see launch/README.md"
# How long a worker or parameter server waits for its chief to answer the first time.
CHIEF_START_SECONDS = 600
# How long the chief of a parameter-server job waits for its workers to answer the first time.
WORKER_START_SECONDS = 600


def make_strategy(name: str, cluster: tf.distribute.cluster_resolver.ClusterResolver | None = None
                  ) -> tf.distribute.Strategy:
    """'mirrored' (all local GPUs), 'multi_worker' (hosts from TF_CONFIG), 'parameter_server'
    (this process is the coordinator of `cluster`, from `parameter_server_cluster`), else the
    default."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        if cluster is None:
            raise ValueError("a parameter-server strategy needs its cluster: pass parameter_server_cluster()")
        with quieted("absl", "WARNING"):  # Connecting logs the whole session config at INFO.
            return tf.distribute.ParameterServerStrategy(cluster)
    return tf.distribute.get_strategy()


def parameter_server_cluster() -> tf.distribute.cluster_resolver.ClusterResolver:
    """The TF_CONFIG cluster, checked to have a chief, workers and parameter servers.

    Raises:
      MtssError: if TF_CONFIG is missing, not JSON, or lacks one of the jobs.
    """
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as e:
        raise MtssError(f"TF_CONFIG is not JSON ({e})") from None
    jobs = config.get("cluster", {}) if isinstance(config, dict) else {}
    missing = [job for job in PS_JOBS if not jobs.get(job)]
    if missing:
        raise MtssError(f"--strategy parameter_server needs TF_CONFIG with a cluster of {', '.join(PS_JOBS)} jobs; "
                        f"{'TF_CONFIG is not set' if not config else 'it has no ' + ', '.join(missing)} "
                        f"({PS_LAUNCH_HINT})")
    task = config.get("task", {})
    if task.get("type") not in PS_JOBS:  # Anything else would start a second coordinator.
        raise MtssError(f"TF_CONFIG's task must be one of the jobs {', '.join(PS_JOBS)}, got {task or 'none'}")
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def serve_if_server(resolver: tf.distribute.cluster_resolver.ClusterResolver, chief_gone_seconds: float) -> bool:
    """In a parameter-server job (`resolver`: `parameter_server_cluster()`), a 'worker' or
    'ps' process serves the coordinator's requests and returns True once the chief, after
    it was up, has not answered for `chief_gone_seconds` (TF servers never stop by
    themselves, and Slurm or a Kubernetes Job waits for every process); the chief returns
    False at once (it trains).

    SIGINT and SIGTERM are ignored: Ctrl-C in a terminal, or a scheduler stopping the job,
    reaches every process, and the chief saves through its servers before it exits.

    Raises:
      MtssError: if the chief never answered within CHIEF_START_SECONDS.
    """
    if resolver.task_type not in ("worker", "ps"):
        return False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type, task_index=resolver.task_id,
                                  protocol=resolver.rpc_layer or "grpc", start=True)
    chief = resolver.cluster_spec().task_address("chief", 0)
    logging.info("%s %d of the parameter-server job serving at %s until the chief at %s is gone",
                 resolver.task_type, resolver.task_id, server.target, chief)
    if not _wait_until_gone([chief], chief_gone_seconds, CHIEF_START_SECONDS):
        raise MtssError(f"the chief at {chief} did not answer within {CHIEF_START_SECONDS} s of this "
                        f"{resolver.task_type}'s start; see the chief's log")
    logging.info("the chief at %s has not answered for %g s: leaving", chief, chief_gone_seconds)
    return True


def watch_workers(resolver: tf.distribute.cluster_resolver.ClusterResolver, gone_seconds: float,
                  on_gone: Callable[[list[str], float], None]) -> threading.Thread:
    """The coordinator of a parameter-server job (`resolver`: `parameter_server_cluster()`)
    calls `on_gone(worker addresses, seconds)`, from a daemon thread, once none of its
    workers has answered for `gone_seconds` after one did, or for WORKER_START_SECONDS (if
    longer) if none ever did: TensorFlow's ClusterCoordinator waits for lost workers
    forever. Workers that come back in time (a launcher restarting one) keep it going."""
    workers = resolver.cluster_spec().job_tasks("worker")
    start_seconds = max(gone_seconds, WORKER_START_SECONDS)

    def watch() -> None:
        on_gone(workers, gone_seconds if _wait_until_gone(workers, gone_seconds, start_seconds) else start_seconds)

    thread = threading.Thread(target=watch, name="watch_workers", daemon=True)
    thread.start()
    return thread


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        return True
    except OSError:
        return False


def _wait_until_gone(addresses: list[str], gone_seconds: float, start_seconds: float, poll_seconds: float = 2.0
                     ) -> bool:
    """Returns True once none of `addresses`, after one first answered, has answered for
    `gone_seconds`; False if none answered within `start_seconds`."""
    last_answer = time.monotonic()
    answered = False
    while time.monotonic() - last_answer < (gone_seconds if answered else start_seconds):
        if any(_answers(address) for address in addresses):
            answered, last_answer = True, time.monotonic()
        time.sleep(poll_seconds)
    return answered


def is_parameter_server(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process coordinates an asynchronous parameter-server job."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints and summaries (the chief, or worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_count(strategy: tf.distribute.Strategy) -> int:
    return strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)


def devices_in_use(strategy: tf.distribute.Strategy,
                   cluster: tf.distribute.cluster_resolver.ClusterResolver | None = None) -> str:
    """Where the steps run, for the log: e.g. 'CPU:0', 'GPU:0, GPU:1', '2 workers x GPU:0';
    a parameter-server strategy's `cluster` (it has no public way to say it) gives
    '2 workers, 1 parameter server'."""
    if is_parameter_server(strategy):
        spec = cluster.cluster_spec()
        workers, servers = spec.num_tasks("worker"), spec.num_tasks("ps")
        return f"{workers} worker{'s' * (workers != 1)}, {servers} parameter server{'s' * (servers != 1)}"
    if not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"  # Where TensorFlow places ops.
    devices = [tf.DeviceSpec.from_string(d) for d in strategy.extended.worker_devices]
    local = ", ".join(f"{d.device_type}:{d.device_index}" for d in devices)
    return f"{worker_count(strategy)} workers x {local}" if is_multi_worker(strategy) else local


def signal_vote(strategy: tf.distribute.Strategy) -> Callable[[int], dict[signal.Signals, int]]:
    """A collective over the workers: takes the number of the signal this worker received
    (0: none) and returns how many workers received each signal ({}: none did).

    Every worker must call it at the same points of the run, as it does a training step.
    Collective all-reduce only sums (MAX is not among its merge ops), so each worker sends a
    one-hot vector over the signal numbers and the sum counts the workers per signal.
    """
    local_replicas = len(strategy.extended.worker_devices)

    @tf.function
    def counts(one_hot: tf.Tensor) -> tf.Tensor:
        return strategy.reduce("SUM", strategy.run(tf.identity, args=(one_hot,)), axis=None)

    def vote(signum: int) -> dict[signal.Signals, int]:
        one_hot = np.zeros(signal.NSIG, np.float32)
        if signum:
            one_hot[signum] = 1
        # Each local replica (e.g. one per GPU) sent this worker's vector once.
        workers = np.rint(counts(tf.constant(one_hot)).numpy() / local_replicas).astype(int)
        return {signal.Signals(s): int(workers[s]) for s in np.flatnonzero(workers)}

    return vote
