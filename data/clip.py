"""The embedded sample clip for ms, and its motion masks computed once and cached.

The clip (data/clips/vtest_street.mp4, 265 frames of a static-camera street scene cut from
OpenCV's sample video; source and licence in data/clips/README.md) ships inside the package,
so `--tasks ms` trains offline on a fresh machine. Its masks are not shipped: they are made
by the extractor on first use (about 20 s on one core) and cached under
$MTSS_CACHE_DIR (default ~/.cache/mtss_train), keyed by the clip's and the settings' digest.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

from absl import logging

from mtss_train.data import motion_masks
from mtss_train.data.motion_saliency import MaskSettings
from mtss_train.errors import DataError, MtssError

CLIP_NAME = "vtest_street.mp4"
CACHE_ENV = "MTSS_CACHE_DIR"


def sample_clip_path() -> str:
    """The embedded clip's path.

    Raises:
      DataError: if the file is missing (an install without the package data).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clips", CLIP_NAME)
    if not os.path.isfile(path):
        raise DataError(f"the embedded sample clip {path} is missing; reinstall mtss-train "
                        "(its package data) or give the ms task a video directory")
    return path


def cache_dir() -> str:
    """$MTSS_CACHE_DIR, else ~/.cache/mtss_train."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mtss_train")


def _digest(path: str, settings: MaskSettings) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    settings_json = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    digest.update(f"{settings_json} manifest {motion_masks.MANIFEST_VERSION}".encode())
    return digest.hexdigest()[:16]


def sample_clip_masks(settings: MaskSettings | None = None) -> str:
    """A directory in the extractor's output format holding the clip's frames and masks.

    Computed on first use (one process, ~20 s at 320x240) and cached; later calls, and other
    processes, reuse it. The cache entry appears atomically (built beside it, then renamed),
    so a killed or concurrent first use never leaves a half-written entry.

    Args:
      settings: extractor settings (default: MaskSettings()); each gets its own cache entry.

    Raises:
      MtssError: if the cache directory cannot be written (set $MTSS_CACHE_DIR elsewhere).
    """
    settings = settings or MaskSettings()
    clip = sample_clip_path()
    root = os.path.join(cache_dir(), "ms_sample_clip")
    final = os.path.join(root, _digest(clip, settings))
    if os.path.isfile(os.path.join(final, "manifest.json")):
        return final
    try:
        os.makedirs(root, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".building-", dir=root)
    except OSError as e:
        raise MtssError(f"cannot write the sample clip's mask cache under {root} ({e}); "
                        f"set ${CACHE_ENV} to a writable directory") from e
    try:
        logging.info("computing motion masks of the sample clip into %s (once)", final)
        motion_masks.extract_directory(clip, work, settings)
        shutil.rmtree(os.path.join(work, "tmp"), ignore_errors=True)
        try:
            os.rename(work, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "manifest.json")):  # Not a concurrent winner.
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
