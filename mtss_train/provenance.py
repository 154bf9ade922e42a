"""Which code made a result: recorded in flags.json and the reproduction's results.json,
so a number can be traced to the commit that produced it."""

import functools
import hashlib
import importlib.metadata
import os
import subprocess

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def code_version() -> str:
    """The git commit this package runs from: '<sha>', or '<sha>-dirty.<digest>' when
    tracked files differ from it (the digest of that difference, so two different edits of
    one commit do not look alike; new untracked files are not seen). Outside a checkout,
    or without git: 'mtss-train <version>' of the installed package."""
    try:
        top = _git("rev-parse", "--show-toplevel")
        if os.path.realpath(top) == os.path.realpath(_REPOSITORY):  # Not a repository that merely contains a venv.
            changes = _git("diff", "HEAD")
            dirty = f"-dirty.{hashlib.sha256(changes.encode()).hexdigest()[:8]}" if changes else ""
            return _git("rev-parse", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"mtss-train {importlib.metadata.version('mtss-train')}"
    except importlib.metadata.PackageNotFoundError:
        return "mtss-train (version unknown)"


def _git(*arguments: str) -> str:
    # --no-optional-locks: reading must not take the index lock a git command of the user's holds.
    return subprocess.run(["git", "--no-optional-locks", "-C", _REPOSITORY, *arguments], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
