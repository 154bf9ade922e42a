"""The tf.distribute strategy of a run and each process's role in it."""

import signal
from typing import Callable

import numpy as np

from mtss_train.compat import tf


def make_strategy(name: str) -> tf.distribute.Strategy:
    """'mirrored' (all local GPUs), 'multi_worker' (hosts from TF_CONFIG), else the default."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


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
