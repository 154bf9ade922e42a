"""The error type users can act on, and the CLI wrapper that prints it as one line."""

import functools
import sys
from typing import Callable


class MtssError(Exception):
    """Bad input the user can fix (a path, a flag, a file); its message says what and where."""


class CheckpointError(MtssError):
    """A checkpoint is missing, unreadable, truncated, or does not fit the model."""


class DataError(MtssError):
    """Training data is missing, empty, or unreadable."""


def cli_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps an absl `main` so an MtssError ends the program with one line and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except MtssError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
