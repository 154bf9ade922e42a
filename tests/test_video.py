"""Video reading: listing, strided and resized RGB frames, bad videos skipped or one clear error."""

import os

import cv2
import numpy as np
import pytest

from mtss_train.data import video
from mtss_train.errors import DataError


def write_video(path: str, frames: list[np.ndarray], fourcc: str = "MJPG") -> str:
    """Writes RGB uint8 [H, W, 3] frames as a video (MJPG: OpenCV's own encoder, always present)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 10, (width, height))
    assert writer.isOpened(), path
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def numbered_frames(count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """Frame i is flat red with green = 20 * i, so a decoded frame tells its number and channel order."""
    width, height = size
    return [np.full([height, width, 3], (200, 20 * i, 0), np.uint8) for i in range(count)]


def frame_number(frame: np.ndarray) -> int:
    return int(round(frame[..., 1].mean() / 20))


def test_frames_are_rgb_strided_resized_and_numbered(tmp_path):
    path = write_video(str(tmp_path / "v.avi"), numbered_frames(10))
    numbers, frames = video.read_video(path, stride=3)
    assert numbers.tolist() == [0, 3, 6, 9]
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_number(f) for f in frames] == [0, 3, 6, 9]  # The right frames, in order.
    assert abs(int(frames[0][..., 0].mean()) - 200) < 8 and frames[0][..., 2].mean() < 8  # RGB, not BGR.
    numbers, frames = video.read_video(path, stride=2, max_side=32, max_frames=3)
    assert numbers.tolist() == [0, 2, 4] and frames.shape == (3, 24, 32, 3)
    assert video.read_video(path, max_side=640)[1].shape == (10, 48, 64, 3)  # Never enlarged.


def test_find_videos_is_recursive_and_filters_extensions(tmp_path):
    for name in ("b/c/clip.MP4", "a.avi", "d.mkv", "e.webm", "f.mov", "notes.txt", "g.jpg", "b/.hidden.avi"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [os.path.relpath(p, tmp_path) for p in video.find_videos(str(tmp_path))]
    assert found == ["a.avi", os.path.join("b", "c", "clip.MP4"), "d.mkv", "e.webm", "f.mov"]
    assert video.video_id(str(tmp_path / "b" / "c" / "clip.MP4"), str(tmp_path)) == "b__c__clip"
    assert video.video_id(str(tmp_path / "a.avi"), str(tmp_path / "a.avi")) == "a"


def test_missing_and_videoless_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        video.find_videos(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=f"no video files .* under {tmp_path}"):
        video.find_videos(str(tmp_path))


def make_bad_videos(directory) -> dict[str, str]:
    """A text file named .mp4, a 0-byte .avi, and a valid AVI header with zero frames."""
    (directory / "text.mp4").write_text("not a video at all")
    (directory / "zero_bytes.avi").write_bytes(b"")
    writer = cv2.VideoWriter(str(directory / "no_frames.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    writer.release()
    assert os.path.getsize(directory / "no_frames.avi") > 0
    return {name: str(directory / name) for name in ("text.mp4", "zero_bytes.avi", "no_frames.avi")}


@pytest.mark.parametrize("name", ["text.mp4", "zero_bytes.avi", "no_frames.avi"])
def test_a_bad_video_on_its_own_is_one_error_naming_it(tmp_path, name):
    path = make_bad_videos(tmp_path)[name]
    with pytest.raises(DataError, match=path):
        video.read_video(path)
    with pytest.raises(DataError, match=path):
        list(video.read_videos(path))


def test_bad_videos_in_a_directory_are_skipped_and_counted(tmp_path):
    bad = make_bad_videos(tmp_path)
    good = write_video(str(tmp_path / "sub" / "good.avi"), numbered_frames(4))
    skipped = []
    read = list(video.read_videos(str(tmp_path), skipped=skipped))
    assert [(path, numbers.tolist(), frames.shape) for path, numbers, frames in read] == [
        (good, [0, 1, 2, 3], (4, 48, 64, 3))]
    assert sorted(s.path for s in skipped) == sorted(bad.values())
    assert all(s.path in s.reason for s in skipped)


def test_a_directory_of_only_bad_videos_is_an_error(tmp_path):
    make_bad_videos(tmp_path)
    with pytest.raises(DataError, match="none of the 3 video file"):
        list(video.read_videos(str(tmp_path)))
