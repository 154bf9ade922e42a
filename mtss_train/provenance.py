"""Which code made a result: recorded in flags.json and the reproduction's results.json,
so a number can be traced to the commit that produced it."""

import functools
import importlib.metadata
import os
import subprocess

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def code_version() -> str:
    """The git commit this package runs from ('<sha>', or '<sha>-dirty' when tracked files
    differ from it), or 'mtss-train <version>' for an installed copy outside a checkout."""
    try:
        top = _git("rev-parse", "--show-toplevel")
        if os.path.realpath(top) == os.path.realpath(_REPOSITORY):  # Not a repository that merely contains a venv.
            changed = _git("status", "--porcelain", "--untracked-files=no")
            return _git("rev-parse", "HEAD") + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"mtss-train {importlib.metadata.version('mtss-train')}"


def _git(*arguments: str) -> str:
    return subprocess.run(["git", "-C", _REPOSITORY, *arguments], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
