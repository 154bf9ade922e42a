"""The motion-mask extractor for the ms task: videos in, frames + foreground masks out.

    python -m mtss_train.data.motion_masks --videos DIR_OR_FILE --out DIR [--workers N]

runs `extract_video` (the pure per-video function: path + settings in, per-frame results out,
no global state, so a distributed engine can call it too) over every video, one process per
video, with a progress line, and a summary at the end. It is resumable: each video's
outputs are built in OUT/tmp and renamed into place, and its record is written last, so
videos already done are skipped and a kill loses at most the videos in progress. The method
is described in `motion_saliency`.

Output format (read by the ms task):
  OUT/manifest.json                      version, settings, and per video: status (ok or
                                         skipped, with the error), frames read and kept,
                                         the kept frame numbers, drops by reason; a summary
  OUT/frames/<video_id>/<frame:06d>.jpg  RGB frame, JPEG quality 95
  OUT/masks/<video_id>/<frame:06d>.png   uint8 [H, W] (frame size), 0 background, 255 foreground
  OUT/videos/<video_id>.json             the video's record; written last, it marks it done
`<frame>` is the frame's number in the video (0-based, counted before striding);
`<video_id>` is the video's path relative to --videos with separators replaced by '__',
sans extension (the file's base name when --videos is one file).

Speed per core: the progress line of a one-core run prints frames/s, e.g. for 320x240
(the sample clip; ~18 frames/s here) and 640x480 (OpenCV's vtest.avi; ~5 frames/s here):
    cd /tmp; M="taskset -c 0 python -m mtss_train.data.motion_masks --workers 1"
    $M --out speed320 --videos $REPO/data/clips/vtest_street.mp4
    $M --out speed640 --max_side 640 --max_frames 150 \\
       --videos /usr/share/doc/opencv-doc/examples/data/vtest.avi
Of the ~55 ms per 320x240 frame, DIS flow (both ways) takes ~25 ms and SLIC ~22 ms; both
scale with the pixel count.
"""

if __name__ == "__main__":  # As a program only: the sample clip's extraction imports this module as a library.
    from mtss_train import startup  # noqa: F401  First: quiets TensorFlow and FFmpeg start-up logs.

import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from concurrent import futures
from typing import Iterator

import cv2
import numpy as np
from absl import app, flags, logging

from mtss_train.data import video as video_lib
from mtss_train.data.files import write_atomically
from mtss_train.data.motion_saliency import DROP_REASONS, FrameMask, MaskSettings, masks_from_frames
from mtss_train.errors import DataError, MtssError, cli_main
from mtss_train.progress import ProgressLine

MANIFEST_VERSION = 1


def extract_video(path: str, settings: MaskSettings) -> Iterator[FrameMask]:
    """The pure per-video function: reads `path` and yields its FrameMasks lazily, in order.

    Raises:
      DataError: if the video cannot be opened, has no frame, or changes frame size.
    """
    settings.validate()
    frames = video_lib.read_frames(path, settings.frame_stride, settings.max_side, settings.max_frames)
    try:
        yield from masks_from_frames(frames, settings)
    except DataError as e:
        if path in str(e):
            raise
        raise DataError(f"{path}: {e}") from e


# The command: videos -> the output format (see the module docstring), resumable.


def _write_json(path: str, value: dict) -> None:
    """Writes JSON atomically (`write_atomically`): a reader or a kill never sees half a file."""
    write_atomically(path, lambda temporary: pathlib.Path(temporary).write_text(json.dumps(value, indent=1)))


def _extract_into(path: str, work: str, settings: MaskSettings) -> dict:
    """Writes the kept frames and masks of `path` under work/frames and work/masks; its record."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept, read, size = [], 0, None
    for kind in ("frames", "masks"):
        os.makedirs(os.path.join(work, kind))
    try:
        for result in extract_video(path, settings):
            read += 1
            size = [result.frame.shape[1], result.frame.shape[0]]
            if result.drop:
                dropped[result.drop] += 1
                continue
            name = f"{result.number:06d}"
            frame = cv2.cvtColor(result.frame, cv2.COLOR_RGB2BGR)
            if not (cv2.imwrite(os.path.join(work, "frames", name + ".jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    and cv2.imwrite(os.path.join(work, "masks", name + ".png"), result.mask.astype(np.uint8) * 255)):
                raise MtssError(f"cannot write frame {name} of {path} under {work} (disk full or not writable?)")
            kept.append(result.number)
    except DataError as e:
        return {"status": "skipped", "error": str(e), "frames_read": read, "frames_kept": 0, "frames": [],
                "dropped": dropped, "size": size}
    return {"status": "ok", "error": None, "frames_read": read, "frames_kept": len(kept), "frames": kept,
            "dropped": dropped, "size": size}


def process_video(path: str, name: str, relative: str, out: str, settings: dict) -> dict:
    """Extracts one video into `out` and returns its record (runs in a worker process).

    The outputs are built in a temporary directory and renamed into place; the record
    (out/videos/<name>.json) is written last, so a kill at any point leaves this video
    either done or redone by the next run.
    """
    settings = MaskSettings(**settings)
    work = tempfile.mkdtemp(prefix=f"{name}.", dir=os.path.join(out, "tmp"))
    try:
        record = {"path": relative, **_extract_into(path, work, settings)}
        for kind in ("frames", "masks"):
            final = os.path.join(out, kind, name)
            shutil.rmtree(final, ignore_errors=True)  # Left by a run killed between these renames.
            if record["status"] == "ok":
                os.rename(os.path.join(work, kind), final)
        _write_json(os.path.join(out, "videos", name + ".json"), record)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(out: str, settings: MaskSettings) -> None:
    """Creates `out`, or checks that its earlier run used the same settings."""
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    manifest = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                previous = json.load(f)["settings"]
        except (OSError, ValueError, KeyError) as e:
            raise MtssError(f"{manifest} is unreadable ({e}); delete {out} or use a new --out") from e
        changed = sorted(k for k in wanted.keys() | previous.keys() if wanted.get(k) != previous.get(k))
        if changed:
            raise MtssError(f"{out} holds masks made with other settings ({', '.join(changed)} differ); "
                            "use a new --out or the same settings")
    shutil.rmtree(os.path.join(out, "tmp"), ignore_errors=True)  # Half-built videos of a killed run.
    try:
        for kind in ("frames", "masks", "videos", "tmp"):
            os.makedirs(os.path.join(out, kind), exist_ok=True)
    except OSError as e:
        raise MtssError(f"cannot create the output directory {out}: {e}") from e


def write_manifest(out: str, videos: str, settings: MaskSettings) -> dict:
    """Gathers the video records under out/videos into out/manifest.json; returns the manifest."""
    records = {}
    for entry in sorted(os.listdir(os.path.join(out, "videos"))):
        if entry.endswith(".json"):
            with open(os.path.join(out, "videos", entry)) as f:
                records[entry[:-len(".json")]] = json.load(f)
    ok = [r for r in records.values() if r["status"] == "ok"]
    summary = {
        "videos": len(records), "ok": len(ok), "skipped": len(records) - len(ok),
        "frames_read": sum(r["frames_read"] for r in records.values()),
        "frames_kept": sum(r["frames_kept"] for r in records.values()),
        "dropped": {reason: sum(r["dropped"][reason] for r in records.values()) for reason in DROP_REASONS},
    }
    manifest = {"version": MANIFEST_VERSION, "videos_dir": os.path.abspath(videos),
                "settings": dataclasses.asdict(settings), "summary": summary, "videos": records}
    _write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _worker_init() -> None:
    cv2.setNumThreads(1)  # One process per core; OpenCV's own threads would oversubscribe.


def extract_directory(videos: str, out: str, settings: MaskSettings, workers: int = 1, progress: bool = False) -> dict:
    """Extracts every video under `videos` (a file or a directory) into `out`; returns the manifest.

    Videos already recorded in `out` are skipped (resume). An unreadable or empty video in a
    directory is recorded as skipped, with the reason, and the run goes on.

    Raises:
      DataError: if `videos` is missing or has no video; if it is one file that cannot be
        read; if none of its videos can be read; if two videos map to one video_id.
      MtssError: if `out` was made with other settings, or cannot be written.
    """
    settings.validate()
    paths = video_lib.find_videos(videos)
    names = video_lib.video_ids(paths, videos)
    _prepare(out, settings)
    write_manifest(out, videos, settings)
    todo = [n for n in names if not os.path.isfile(os.path.join(out, "videos", n + ".json"))]
    logging.info("%d videos under %s, %d already done, %d to do", len(names), videos, len(names) - len(todo), len(todo))
    bar = ProgressLine("motion masks", len(todo), "videos", enabled=progress)
    frames = 0

    def finished(record: dict) -> None:
        nonlocal frames
        frames += record["frames_read"]
        bar.advance(detail=f"{frames:,} frames ({frames / max(bar.seconds, 1e-9):.1f}/s)")

    jobs = [(names[n], n, os.path.relpath(names[n], videos) if os.path.isdir(videos) else os.path.basename(videos),
             out, dataclasses.asdict(settings)) for n in todo]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finished(process_video(*job))
    else:
        context = multiprocessing.get_context("spawn")  # Forking a process that runs TF can deadlock.
        with futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_worker_init) as pool:
            try:
                for done in futures.as_completed([pool.submit(process_video, *job) for job in jobs]):
                    finished(done.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.finish(detail=f"{frames:,} frames")
    manifest = write_manifest(out, videos, settings)
    skipped = {n: r["error"] for n, r in manifest["videos"].items() if r["status"] != "ok"}
    for name, error in skipped.items():
        logging.warning("skipped %s: %s", name, error)
    if os.path.isfile(videos) and skipped:
        raise DataError(next(iter(skipped.values())))
    if not manifest["summary"]["ok"]:
        raise DataError(f"none of the {len(names)} video(s) under {videos} could be read (see {out}/manifest.json)")
    return manifest


def _settings_help() -> dict[str, str]:
    """MaskSettings field -> its text in the class docstring (so --help and the docs agree)."""
    helps, names = {}, []
    for line in (MaskSettings.__doc__ or "").split("Attributes:")[-1].splitlines():
        head, _, text = line.strip().partition(": ")
        if all(name in MaskSettings.__dataclass_fields__ for name in head.split(", ")) and text:
            names = head.split(", ")  # "a, b: text" documents both fields.
            helps.update({name: text for name in names})
        elif line.strip():  # A continuation line of the entry above.
            helps.update({name: f"{helps[name]} {line.strip()}" for name in names})
    return helps


def _define_flags() -> None:
    """The command's flags; defined only when run as a command, so importing this module
    from a training binary adds no flags to it."""
    flags.DEFINE_string("videos", None, "A video file, or a directory searched recursively for "
                        f"{', '.join(video_lib.VIDEO_EXTENSIONS)} files.", required=True)
    flags.DEFINE_string("out", None, "Output directory (see the module docstring); rerun to resume.", required=True)
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "Videos processed in parallel (processes).")
    flags.DEFINE_bool("progress", True, "Show a progress line on stderr.")
    helps = _settings_help()
    for field in dataclasses.fields(MaskSettings):
        define = {str: flags.DEFINE_string, float: flags.DEFINE_float}.get(type(field.default), flags.DEFINE_integer)
        define(field.name, field.default, helps.get(field.name, ""))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    settings = {f.name: values[f.name].value for f in dataclasses.fields(MaskSettings)}
    for name in ("max_side", "max_frames"):
        settings[name] = settings[name] or None  # 0 on the command line means "no limit".
    settings = MaskSettings(**settings)
    manifest = extract_directory(values.videos, values.out, settings, values.workers, values.progress)
    summary = manifest["summary"]
    dropped = ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items())
    print(f"{summary['videos']} videos ({summary['ok']} ok, {summary['skipped']} skipped); "
          f"{summary['frames_kept']} of {summary['frames_read']} frames kept; dropped: {dropped}; "
          f"written to {values.out}")


if __name__ == "__main__":
    _define_flags()
    app.run(cli_main(main))
