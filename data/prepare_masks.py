"""Motion-mask shards for the ms task, made by an Apache Beam pipeline (`prepare masks`).

The per-video work is the extractor command's own function, `motion_masks.extract_video`
(one implementation, two drivers). This module runs it on one video per pipeline element
and encodes what it yields as the command writes its files: frames as JPEG quality 95,
masks as PNG of 0/255, and the same per-video record.

Output (the ms task reads it with `--task_param ms.data=OUT`):
  OUT/masks-SSSSS-of-NNNNN.tfrecord  tf.train.Examples: image/encoded (JPEG frame),
                                     mask/encoded (PNG mask, frame size), image/height,
                                     image/width, video/id, frame/number; ordered by a digest
                                     of (video id, frame), so every shard mixes videos
  OUT/manifest.json                  settings; the command's summary (videos ok/skipped,
                                     frames read/kept, drops by reason); skipped videos with
                                     their error; per video the command's record
A video's encoded frames are held in memory until it is done (~25 KB per kept 320x240
frame), so a video that fails half-way adds no frames, as with the command.
"""

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator

import cv2
import numpy as np
from absl import logging

from mtss_train.compat import tf
from mtss_train.data import beam_io, motion_masks
from mtss_train.data import video as video_lib
from mtss_train.data.beam_io import beam
from mtss_train.data.masks import TFRECORD_FRAME_KEY, TFRECORD_MASK_KEY
from mtss_train.data.motion_saliency import DROP_REASONS, FrameMask, MaskSettings
from mtss_train.errors import DataError

PREFIX = "masks"
FRAME_JPEG_QUALITY = 95  # As the extractor command writes frames.
_VIDEOS = "videos"
_COUNTERS = "mtss_prepare_masks"


def encode_result(result: FrameMask) -> tuple[bytes, bytes]:
    """(JPEG of the RGB frame, PNG of the mask as uint8 0/255), as the extractor command writes them."""
    frame_ok, frame = cv2.imencode(".jpg", cv2.cvtColor(result.frame, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, FRAME_JPEG_QUALITY])
    mask_ok, mask = cv2.imencode(".png", result.mask.astype(np.uint8) * 255)
    if not (frame_ok and mask_ok):
        raise DataError(f"cannot encode frame {result.number} ({result.frame.shape})")
    return frame.tobytes(), mask.tobytes()


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str]:
    """`path` itself if local, else a temporary local copy (OpenCV reads local files only)."""
    if beam_io.is_local(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mtss-video-") as directory:
        local = os.path.join(directory, os.path.basename(path))
        try:
            tf.io.gfile.copy(path, local)
        except tf.errors.OpError as e:
            raise DataError(f"cannot copy {path} to read it: {e.message}") from e
        yield local


def extract_record(path: str, relative: str, settings: MaskSettings) -> tuple[dict, list[tuple]]:
    """Runs the extractor on one video: (its record, its kept frames).

    The record has the fields of the command's OUT/videos/<id>.json: path (`relative`),
    status ('ok', or 'skipped' with the error), frames_read, frames_kept, frames (kept
    numbers), dropped (count per DROP_REASONS), size ([width, height]). Kept frames are
    (number, JPEG bytes, PNG bytes, height, width). A video that cannot be read is
    'skipped', never raised: one bad file must not stop a pipeline over thousands.
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept, read, size = [], 0, None
    try:
        with _local_copy(path) as local:
            try:
                for result in motion_masks.extract_video(local, settings):
                    read += 1
                    size = [result.frame.shape[1], result.frame.shape[0]]
                    if result.drop:
                        dropped[result.drop] += 1
                        continue
                    kept.append((result.number, *encode_result(result), *result.frame.shape[:2]))
            except DataError as e:
                raise DataError(str(e).replace(local, path)) from e  # Name the user's path, not the copy.
    except Exception as e:  # Recorded with its type; the traceback goes to the log.
        if not isinstance(e, DataError):
            logging.exception("extracting %s failed", path)
        error = str(e) if isinstance(e, DataError) else f"{path}: {type(e).__name__}: {e}"
        return {"path": relative, "status": "skipped", "error": error, "frames_read": read, "frames_kept": 0,
                "frames": [], "dropped": dropped, "size": size}, []
    return {"path": relative, "status": "ok", "error": None, "frames_read": read, "frames_kept": len(kept),
            "frames": [frame[0] for frame in kept], "dropped": dropped, "size": size}, kept


def _extract(path: str, root: str, settings: MaskSettings, shards: int) -> Iterator:
    """Beam step: (shard, (digest, Example)) per kept frame; (video id, record) on the videos output."""
    name = video_lib.video_id(path, root)
    # One worker process per core, as the command's pool: OpenCV's own threads would
    # oversubscribe the machine. Restored after, as in-process runners share the setting.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        record, frames = extract_record(path, os.path.relpath(path, root), settings)
    finally:
        cv2.setNumThreads(threads)
    counter = beam.metrics.Metrics.counter
    counter(_COUNTERS, "videos_" + record["status"]).inc()
    counter(_COUNTERS, "frames_read").inc(record["frames_read"])
    counter(_COUNTERS, "frames_kept").inc(record["frames_kept"])
    yield beam.pvalue.TaggedOutput(_VIDEOS, (name, record))
    for number, jpeg, png, height, width in frames:
        key = beam_io.digest(f"{name}/{number}".encode())
        yield beam_io.shard_of(key, shards), (key, beam_io.example({
            TFRECORD_FRAME_KEY: jpeg, "image/format": "jpeg", "image/height": height, "image/width": width,
            TFRECORD_MASK_KEY: png, "mask/format": "png", "video/id": name, "frame/number": number,
        }))


def _write(shard: tuple, run: str, shards: int) -> dict:
    """Beam step: writes shard (index, [(digest, Example)]) in digest order."""
    index, frames = shard
    return beam_io.write_shard((record for _, record in sorted(frames)), run,
                               beam_io.shard_name(PREFIX, index, shards))


def summarize(records: dict[str, dict]) -> dict:
    """The command's manifest summary of per-video records."""
    ok = [r for r in records.values() if r["status"] == "ok"]
    return {
        "videos": len(records), "ok": len(ok), "skipped": len(records) - len(ok),
        "frames_read": sum(r["frames_read"] for r in records.values()),
        "frames_kept": sum(r["frames_kept"] for r in records.values()),
        "dropped": {reason: sum(r["dropped"][reason] for r in records.values()) for reason in DROP_REASONS},
    }


def _commit(_, written: list[dict], videos: list[tuple[str, dict]], plan: beam_io.Plan) -> None:
    """Beam step (once, after every shard): moves the shards into place and writes the manifest."""
    records = dict(sorted(videos))
    skipped = {name: r["error"] for name, r in records.items() if r["status"] != "ok"}
    beam_io.commit(plan, PREFIX, written, {"summary": summarize(records), "skipped_videos": skipped,
                                           "videos": records})


def _check_ids(root: str, paths: list[str]) -> None:
    """Raises DataError if two videos would get one video id (as the command does)."""
    video_lib.video_ids(paths, root)


def prepare_masks(pattern: str, output: str, shards: int, settings: MaskSettings,
                  options: "beam.options.pipeline_options.PipelineOptions") -> dict:
    """Runs the masks pipeline (see the module docstring) to the end; returns the manifest.

    Args:
      pattern: a glob, or a directory searched recursively for video_lib.VIDEO_EXTENSIONS.
      output: the output directory (local or any tf.io.gfile filesystem).
      shards: the number of TFRecord files.
      settings: the extractor's settings.
      options: Beam pipeline options (the runner and its settings).

    Raises:
      DataError: if `pattern` matches nothing, or two videos would share a video id.
      MtssError: if a setting is bad, or `output` cannot be written or holds other data.
    """
    settings.validate()
    plan = beam_io.make_plan("masks", pattern, video_lib.VIDEO_EXTENSIONS, output, shards,
                             dataclasses.asdict(settings), check=_check_ids)
    return beam_io.run_pipeline(plan, options, _extract, _write, _commit, _VIDEOS, settings)
