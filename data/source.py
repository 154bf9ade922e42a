"""What a task reads its raw examples from, and how bad inputs are counted and named."""

import threading
from typing import Callable, ClassVar, Protocol

from absl import logging

from mtss_train.compat import tf

# What a skip reason says when its reader gave none.
UNKNOWN_REASON = "unusable"


class SkipCounter:
    """Counts the distinct inputs a pipeline skipped (unreadable, too small, ...) and names
    each one once, in a warning, when it is first met.

    A bad file is met again on every epoch and by every task that reads the source; it is
    counted once, by key (its path, or a file and record number).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._reasons: dict[str, str] = {}

    def add(self, key: str, reason: str = UNKNOWN_REASON) -> None:
        with self._lock:
            if key in self._keys:
                return
            self._keys.add(key)
            self._reasons[key] = reason
        logging.warning("skipping %s: %s", key, reason)

    def reporter(self, explain: Callable[[str, bytes], str]) -> Callable[[bytes, bytes, bytes], None]:
        """A `report` for `mtss_train.data.in_graph.decoded`: (key, reason, evidence) as bytes ->
        adds the key with `explain(reason, evidence)` as its reason, explained only when new."""

        def report(key: bytes, reason: bytes, evidence: bytes) -> None:
            name = key.decode(errors="replace")
            if name not in self:
                self.add(name, explain(reason.decode(errors="replace"), evidence))

        return report

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    @property
    def count(self) -> int:
        return len(self._keys)

    def reasons(self) -> dict[str, str]:
        """Key -> why it was skipped, in the order they were met."""
        with self._lock:
            return dict(self._reasons)

    def summary(self, limit: int = 10) -> str:
        """'N skipped: key: reason; ...' naming the first `limit`; '' if none."""
        reasons = self.reasons()
        if not reasons:
            return ""
        named = [f"{key}: {reason}" for key, reason in list(reasons.items())[:limit]]
        more = f"; and {len(reasons) - limit} more (named in the log above)" if len(reasons) > limit else ""
        return f"{len(reasons)} skipped: " + "; ".join(named) + more


class Source(Protocol):
    """A task's raw input: endless shuffled examples, sharded per input pipeline.

    Attributes:
      path: what messages name (the directory or file the user gave).
      skipped: the bad inputs met so far.
      builds_remotely: optional, False if absent. True promises that `dataset` is TF ops
        only (a Python call for a skipped input aside, as `mtss_train.data.in_graph` makes
        it) and takes `seed` as a scalar int64 tensor, so each parameter-server worker
        builds and reads it itself with a seed of its own. Otherwise such a worker's
        pipeline gets the int seed and runs its Python in the coordinator.
    """

    path: str
    skipped: SkipCounter
    builds_remotely: ClassVar[bool] = False

    def dataset(self, seed: int | tf.Tensor, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Endless, shuffled by `seed`; `shard` = (number of input pipelines, this one's index)."""


def builds_remotely(source: Source) -> bool:
    """The source's `builds_remotely`, False for a source (e.g. a plugin's) that does not say."""
    return bool(getattr(source, "builds_remotely", False))
