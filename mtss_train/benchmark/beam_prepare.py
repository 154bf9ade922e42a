"""Frames/s of the Beam masks pipeline (`python -m mtss_train.data.prepare masks`) with one
and two local worker processes, on the embedded sample clip.

The pipeline hands whole videos to workers, so one clip would leave the second worker idle:
the input is the clip linked under several names (an even number gives two workers equal
shares). Every run is the whole pipeline on Beam's FnApiRunner in multi_processing mode with
fresh worker processes, timed by the wall clock from listing to the committed manifest. The
workers' start-up (importing TensorFlow and OpenCV) is in that time, so a run of few frames
understates what a second worker gains. The work happens in the worker processes, which
this process's CPU clock does not see: wall time only, so the figures need a quiet machine.
"""

import os
import shutil
import tempfile
import time

from apache_beam.options.pipeline_options import PipelineOptions

from mtss_train.benchmark.timing import load_average, spread
from mtss_train.data.clip import sample_clip_path
from mtss_train.data.motion_saliency import MaskSettings
from mtss_train.data.prepare import DEFAULT_RUNNER
from mtss_train.data.prepare_masks import prepare_masks
from mtss_train.errors import MtssError

WORKERS = (1, 2)
SHARDS = 2  # Writing shards is a small share of the work at any count; few keep it small.


def _options(workers: int) -> PipelineOptions:
    return PipelineOptions([f"--runner={DEFAULT_RUNNER}", f"--direct_num_workers={workers}",
                            "--direct_running_mode=multi_processing"])


def _linked_clips(directory: str, videos: int) -> str:
    """A directory of `videos` links to the sample clip (distinct names: distinct video ids)."""
    inputs = os.path.join(directory, "videos")
    os.mkdir(inputs)
    for index in range(videos):
        os.symlink(sample_clip_path(), os.path.join(inputs, f"clip{index:03d}.mp4"))
    return inputs


def masks_rates(videos: int, frames: int, rounds: int) -> dict:
    """Runs the masks pipeline with each of WORKERS worker processes in interleaved rounds on
    the same input; prints each run and the summary.

    Args:
      videos: links to the sample clip in the input (one pipeline element each).
      frames: frames used per video (MaskSettings.max_frames; the clip has 265).
      rounds: rounds of one run per worker count; odd rounds run them in reverse order,
        so a steady drift in load favours neither.

    Returns:
      {'videos', 'frames_per_video', 'frames_read', 'frames_kept' (per run), 'rounds': per
      round {'load', '1', '2': {'seconds', 'frames_per_s'}, 'two_over_one'},
      'frames_per_s': {'1', '2': spread over rounds}, 'two_over_one': spread of the
      per-round ratios of frames/s}.

    Raises:
      MtssError: if a run skipped a video (its rate would not be comparable).
    """
    settings = MaskSettings(max_frames=frames)
    print(f"\n== beam: masks pipeline, {videos} links to the sample clip x {frames} frames, "
          f"1 vs 2 worker processes (FnApiRunner, multi_processing), load {load_average():.1f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mtss-beam-benchmark-") as work:
        inputs = _linked_clips(work, videos)
        output = os.path.join(work, "out")
        for index in range(rounds):
            row = {}
            for workers in WORKERS if index % 2 == 0 else WORKERS[::-1]:
                start = time.perf_counter()
                summary = prepare_masks(inputs, output, SHARDS, settings, _options(workers))["summary"]
                seconds = time.perf_counter() - start
                shutil.rmtree(output)  # Every run starts from an empty output, as the first.
                if summary["ok"] != videos:
                    raise MtssError(f"beam benchmark: {summary['skipped']} of {videos} videos skipped")
                row[str(workers)] = {"seconds": seconds, "frames_per_s": summary["frames_read"] / seconds}
                print(f"round {index + 1}: {workers} worker(s) {seconds:6.1f} s  "
                      f"{row[str(workers)]['frames_per_s']:6.1f} frames/s", flush=True)
            row["load"] = load_average()
            row["two_over_one"] = row["2"]["frames_per_s"] / row["1"]["frames_per_s"]
            rows.append(row)
    result = {
        "videos": videos, "frames_per_video": frames, "frames_read": summary["frames_read"],
        "frames_kept": summary["frames_kept"], "rounds": rows,
        "frames_per_s": {str(w): spread([r[str(w)]["frames_per_s"] for r in rows]) for w in WORKERS},
        "two_over_one": spread([r["two_over_one"] for r in rows]),
    }
    for workers in WORKERS:
        rate = result["frames_per_s"][str(workers)]
        print(f"{workers} worker(s): median {rate['median']:.1f} frames/s (min {rate['min']:.1f}, "
              f"max {rate['max']:.1f}) over {summary['frames_read']} frames a run")
    ratio = result["two_over_one"]
    print(f"2 workers / 1 worker: median {ratio['median']:.2f}x (min {ratio['min']:.2f}, max {ratio['max']:.2f}) "
          f"over {rounds} rounds; load {rows[-1]['load']:.1f} at the end (worker start-up included)")
    return result
