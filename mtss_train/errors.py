"""The error type users can act on, the CLI wrapper that prints it as one line, and Ctrl-C
that stays Ctrl-C whatever exception TensorFlow turns it into."""

import contextlib
import functools
import sys
from typing import Callable, Iterator

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a program ended by Ctrl-C.

_ctrl_c_pressed = False


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
            print(f"error: {message(e)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)

    return wrapped


def message(error: MtssError) -> str:
    """The error's own one-line message. Keras re-raises an error from a layer's call as a
    new one of the same class whose message puts lines of its own (the layer, its call
    arguments) around the original's; the original is its context. Ours are one line, and
    one of ours that adds to another's message is kept whole."""
    inner = error.__context__
    while "\n" in str(error) and isinstance(inner, MtssError) and str(inner) in str(error):
        error, inner = inner, inner.__context__
    return str(error)


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """SIGINT handler: raises KeyboardInterrupt, as Python's own does, and remembers it.

    The exception may not arrive as itself. Raised inside TensorFlow, a `with` block's exit
    can fail on the half-entered block and replace it (slim's variable scopes raise
    "Improper nesting of variable_scope"), and C++ code that calls Python can swallow it or
    raise an error of its own (CI once saw a TypeError from tf.nest); `ctrl_c_pressed`
    still knows.
    """
    global _ctrl_c_pressed
    _ctrl_c_pressed = True
    raise KeyboardInterrupt


def ctrl_c_pressed() -> bool:
    """Whether `raise_keyboard_interrupt` has run in this process."""
    return _ctrl_c_pressed


@contextlib.contextmanager
def ctrl_c_wins() -> Iterator[None]:
    """Inside: an exception after Ctrl-C comes out as KeyboardInterrupt, since it is (or
    was caused by) the interrupt unwinding through code that did not expect it."""
    try:
        yield
    except Exception:
        if not _ctrl_c_pressed:
            raise
        raise KeyboardInterrupt from None
