"""Listing input files: directory trees with links, and which files hold TFRecords; writing
output files atomically.

No TensorFlow here: video and mask-extraction worker processes use it too.
"""

import fnmatch
import os
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


def write_atomically(path: str, write: Callable[[str], object]) -> None:
    """Has `write` write a temporary file beside `path`, then renames it to `path`: a crash
    leaves no half-written file, and two processes writing the same path at once leave one
    whole copy. The temporary file is removed if `write` or the rename fails; the error
    propagates."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
