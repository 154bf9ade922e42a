"""The error type users can act on, and the CLI wrapper that prints it as one line."""

import functools
import sys
from typing import Callable

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a program ended by Ctrl-C.


class MtssError(Exception):
    """Bad input the user can fix (a path, a flag, a file); its message says what and where."""


class CheckpointError(MtssError):
    """A checkpoint is missing, unreadable, truncated, or does not fit the model."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are damaged: a garbage index, a missing or truncated data file."""


class DataError(MtssError):
    """Training data is missing, empty, or unreadable."""


def cli_main(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps an absl `main` so an MtssError ends the program with one line and exit code 2,
    and Ctrl-C with one line and 130 (the shell's 128 + SIGINT), not a traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except MtssError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)

    return wrapped
