"""Video files read with OpenCV (TF cannot decode video): listing, strided and resized frames.

A video that OpenCV cannot open, or that yields no frame, is one `DataError` naming the file
when it is read on its own; `read_videos` over a directory skips it, says why, and goes on.
"""

import dataclasses
import os
from typing import Iterator

import cv2
import numpy as np
from absl import logging

from mtss_train.data.files import walk_files
from mtss_train.errors import DataError

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm")


@dataclasses.dataclass(frozen=True)
class SkippedVideo:
    """A video left out of a directory read, and why (the DataError message)."""

    path: str
    reason: str


def find_videos(path: str) -> list[str]:
    """The video files under `path` (recursive, sorted), or `[path]` if it is a file.

    A file given directly is returned whatever its extension: the user named it, so reading
    it will say whether it is a video.

    Raises:
      DataError: if `path` does not exist, or a directory holds no video files.
    """
    if not os.path.exists(path):
        raise DataError(f"video path {path} does not exist")
    if os.path.isfile(path):
        return [path]
    videos = sorted(
        p for p in walk_files(path)
        if p.lower().endswith(VIDEO_EXTENSIONS) and not os.path.basename(p).startswith(".")
    )
    if not videos:
        raise DataError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {path}")
    return videos


def video_id(path: str, root: str) -> str:
    """A flat, unique name for `path`: its path relative to `root`, separators -> '__', sans extension.

    When `root` is the video file itself, the name is the file's base name sans extension.
    """
    relative = os.path.basename(path) if os.path.isfile(root) else os.path.relpath(path, root)
    stem = os.path.splitext(relative)[0]
    return stem.replace(os.sep, "__").replace("/", "__")


def video_ids(paths: list[str], root: str) -> dict[str, str]:
    """{video_id: path} of videos found under `root`.

    Raises:
      DataError: if two videos would share one id (their outputs would collide).
    """
    names: dict[str, str] = {}
    for path in paths:
        name = video_id(path, root)
        if name in names:
            raise DataError(f"{names[name]} and {path} would share the video id {name!r}; rename one")
        names[name] = path
    return names


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) shrunk so the longer side is at most `max_side` (never enlarged)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_frames(
    path: str, stride: int = 1, max_side: int | None = None, max_frames: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (frame number, RGB uint8 [H, W, 3]) for every `stride`-th frame of a video.

    Frames are decoded lazily (a long video is never held in memory). The frame number
    counts all decoded frames from 0, before striding.

    Args:
      path: the video file.
      stride: keep frames 0, stride, 2*stride, ...
      max_side: shrink frames (INTER_AREA) so their longer side is at most this; None keeps them.
      max_frames: stop after this many kept frames; None reads to the end.

    Raises:
      DataError: if OpenCV cannot open the file or it yields no frame (raised on first use).
    """
    if stride < 1 or (max_frames is not None and max_frames < 1):
        raise DataError(f"reading {path}: stride ({stride}) and max_frames ({max_frames}) must be >= 1")
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise DataError(f"{path} cannot be opened as a video (not a video, or a codec OpenCV lacks)")
        kept = 0
        number = -1
        while max_frames is None or kept < max_frames:
            # grab() skips the decode of frames the stride leaves out.
            if not capture.grab():
                break
            number += 1
            if number % stride:
                continue
            ok, frame = capture.retrieve()
            if not ok or frame is None or frame.size == 0:
                break
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            size = scaled_size(frame.shape[1], frame.shape[0], max_side)
            if size != (frame.shape[1], frame.shape[0]):
                frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            kept += 1
            yield number, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        if kept == 0:
            raise DataError(f"{path} holds no decodable video frame (empty, truncated or not a video)")
    finally:
        capture.release()


def read_video(
    path: str, stride: int = 1, max_side: int | None = None, max_frames: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All kept frames of one video: (frame numbers int64 [T], RGB uint8 [T, H, W, 3]).

    Raises:
      DataError: as `read_frames`.
    """
    numbers, frames = zip(*read_frames(path, stride, max_side, max_frames))
    return np.asarray(numbers, np.int64), np.stack(frames)


def read_videos(
    path: str,
    stride: int = 1,
    max_side: int | None = None,
    max_frames: int | None = None,
    skipped: list[SkippedVideo] | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields (video path, frame numbers [T], frames [T, H, W, 3]) per readable video under `path`.

    Inside a directory, an unreadable or empty video is logged, appended to `skipped` and
    left out. A single file given as `path` that cannot be read is an error.

    Raises:
      DataError: if `path` is missing, holds no videos, is one unreadable file, or none of
        its videos can be read.
    """
    videos = find_videos(path)
    skipped = [] if skipped is None else skipped
    read = 0
    for video in videos:
        try:
            numbers, frames = read_video(video, stride, max_side, max_frames)
        except DataError as e:
            if len(videos) == 1 and os.path.isfile(path):
                raise
            logging.warning("skipping video: %s", e)
            skipped.append(SkippedVideo(video, str(e)))
            continue
        read += 1
        yield video, numbers, frames
    if read == 0:
        raise DataError(f"none of the {len(videos)} video file(s) under {path} could be read")
