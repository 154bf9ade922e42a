"""Listing input files: directory trees with links, and which files hold TFRecords; writing
output files atomically.

No TensorFlow here: video and mask-extraction worker processes use it too.
"""

import contextlib
import errno
import fnmatch
import os
import uuid
from typing import Callable

from absl import logging

TFRECORD_PATTERNS = ("*.tfrecord", "*.tfrecords", "*.tfrecord-*", "*.tfrecords-*")


def is_tfrecord(path: str) -> bool:
    """Whether the file's name says it holds TFRecords (see TFRECORD_PATTERNS)."""
    return any(fnmatch.fnmatch(os.path.basename(path), pattern) for pattern in TFRECORD_PATTERNS)


def walk_files(path: str) -> list[str]:
    """Every file under `path`, following directory links but entering each real
    directory once: a link back up the tree (`ln -s . loop`) would otherwise recurse
    forever. Skipped links are logged with their count."""
    seen: set[str] = set()
    skipped: list[str] = []
    files = []
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            skipped.append(root)
            dirs[:] = []
            continue
        seen.add(real)
        files.extend(os.path.join(root, name) for name in names)
    if skipped:
        logging.warning("%s: skipped %d linked directories already listed (e.g. %s)", path, len(skipped), skipped[0])
    return files


def temporary_name(path: str) -> str:
    """A name beside `path` for a file that becomes `path` once whole: `path`.<8 random hex
    digits>.tmp. The random part keeps writers of the same path apart (threads of one
    process, processes of one host, hosts sharing the file system); the suffix keeps
    readers that look for `path`'s extension from seeing it."""
    return f"{path}.{uuid.uuid4().hex[:8]}.tmp"


def write_atomically(path: str, write: Callable[[str], object]) -> None:
    """Has `write` write a new file beside `path`, then renames it to `path`: readers and a
    crash see the old file or the whole new one, never part of one, and writers of the same
    path at once leave one whole copy (each writes its own file, `temporary_name`). The new
    file's data and its name are on disk (fsync) when this returns, so a power cut cannot
    leave `path` empty either. The temporary file is removed if `write` or the rename
    fails; the error propagates.

    `write` gets the temporary file's name; the file exists, empty, with the permissions a
    plain `open(path, "w")` gives (tempfile.mkstemp would make it readable by its owner only).
    """
    directory = os.path.dirname(os.path.abspath(path))
    while True:  # A clash of 32 random bits is improbable, but O_EXCL makes it harmless.
        temporary = temporary_name(path)
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync(directory)  # Makes the rename itself durable.


def _fsync(path: str) -> None:
    """Flushes a file's or directory's data to disk. File systems that cannot sync a
    directory (EINVAL: some network and FUSE mounts) are left to sync it themselves."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as e:
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(descriptor)
