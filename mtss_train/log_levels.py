"""A logger quieted for a block, its own level restored after."""

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quieted(name: str, level: str) -> Iterator[None]:
    """Inside: logger `name` passes records of `level` ("WARNING", "ERROR") and up only.

    After, the logger's own level comes back (usually NOTSET: it defers to its parents), not
    the level it had in effect, which absl's `set_verbosity(get_verbosity())` would pin: a
    parent set lower later, such as a program's --verbosity or pytest's caplog, would then
    no longer reach it.
    """
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
