"""What a task reads its raw examples from, and how bad inputs are counted and named."""

import threading
from typing import Protocol

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
    """

    path: str
    skipped: SkipCounter

    def dataset(self, seed: int, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Endless, shuffled by `seed`; `shard` = (number of input pipelines, this one's index).

        A source may also take `pure_tf: bool = False`: with True, build the dataset from
        TF ops only (no tf.numpy_function), so parameter-server workers can run it
        themselves; `seed` may then be a scalar int64 tensor.
        """
