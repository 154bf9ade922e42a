"""What a task reads its raw examples from, and how bad inputs are counted."""

import threading
from typing import Protocol

from mtss_train.compat import tf


class SkipCounter:
    """Counts the distinct inputs a pipeline skipped (unreadable, too small, ...).

    A bad file is met again on every epoch and by every task that reads the source; it is
    counted once, by key (its path, or a digest of a record).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._keys: set[str] = set()

    def add(self, key: str) -> None:
        with self._lock:
            self._keys.add(key)

    @property
    def count(self) -> int:
        return len(self._keys)


class Source(Protocol):
    """A task's raw input: endless shuffled examples, sharded per input pipeline.

    Attributes:
      path: what messages name (the directory or file the user gave).
      skipped: the bad inputs met so far.
    """

    path: str
    skipped: SkipCounter

    def dataset(self, seed: int, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Endless, shuffled by `seed`; `shard` = (number of input pipelines, this one's index)."""
