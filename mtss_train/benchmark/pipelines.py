"""Each task's input pipeline against what the trunk consumes, and the ms extractor's speed.

Rates "per core" divide by the CPU time this process spent (all its threads), not by wall
time: a pipeline that makes 100 examples per CPU-second needs a tenth of a core to feed a
trunk step that eats 10 examples/s, whatever else the machine is doing.
"""

import contextlib
import itertools
from typing import Callable, Iterator

import cv2
import numpy as np

from mtss_train.benchmark.timing import Sample, interleaved_rounds, time_calls
from mtss_train.compat import tf
from mtss_train.data import video
from mtss_train.data.clip import sample_clip_path
from mtss_train.data.motion_saliency import MaskSettings, masks_from_frames
from mtss_train.task import Batch, Task
from mtss_train.train.trainer import Trainer

# The two frame sizes the extractor's speed is quoted at: (width, height).
EXTRACTOR_SIZES = ((320, 240), (640, 480))
# Fewest batches the input pipeline alone is timed over: a pipeline batch is cheap next to a
# step, and a few batches would mostly time its start.
INPUT_BATCHES = 20


def trunk_gradients_fn(trainer: Trainer, task_name: str, batch: Batch) -> Callable[[], list[tf.Tensor]]:
    """A compiled call: forward + backward of the bare trunk on the task's trunk input
    (loss: the mean of block3), no head, no optimizer. Returns the trunk's gradients."""
    variables = trainer.model.trunk.trainable_variables

    @tf.function
    def trunk_gradients() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            block3, _ = trainer.model.features(task_name, batch, training=True)
            loss = tf.reduce_mean(tf.cast(block3, tf.float32))
        return tape.gradient(loss, variables)

    return trunk_gradients


def input_seconds(task: Task, source: tf.data.Dataset, batches: int, warmup: int) -> Sample:
    """Seconds per batch of the task's pipeline alone: a fresh pipeline, `warmup` batches,
    then `batches` timed batches pulled back to back.

    Pulled back to back, its prefetch buffers stay near empty, so the time is the pipeline's
    own; a pipeline left idle fills them and would then look as fast as a buffer read.
    """
    iterator = iter(task.make_dataset(source, task.config.batch_size, seed=1))
    for _ in range(warmup):
        next(iterator)
    return time_calls(lambda: next(iterator), batches)


def measure_task(trainer: Trainer, task: Task, batch: Batch, iterator: Iterator, calls: int,
                 warmup: int) -> dict[str, Sample]:
    """Seconds per batch of the task's input pipeline alone (at least INPUT_BATCHES
    batches; the one pipeline every strategy runs, parameter-server workers included), the
    bare trunk's forward + backward, the trainer's step on a fixed batch, and the step fed
    by `iterator` (whose pipeline refills its buffers during the steps)."""
    train_step = trainer.runner.train_step((task.name,))
    source = trainer.sources[task.name]
    timed = {"input": input_seconds(task, source.dataset(seed=1), max(calls, INPUT_BATCHES), warmup)}
    contenders = {
        "trunk": trunk_gradients_fn(trainer, task.name, batch),
        "step": lambda: train_step({task.name: batch}),
        "trained": lambda: train_step({task.name: next(iterator)}),
    }
    samples = interleaved_rounds(contenders, rounds=1, calls=calls, warmup=warmup)
    timed.update({name: samples[name][0] for name in contenders})
    return timed


def feeding(samples: dict[str, Sample], examples: int) -> dict[str, float]:
    """The pipeline's supply against the trunk's demand, in examples (per batch: `examples`).

    Returns:
      input_per_core: examples the pipeline makes per CPU-second;
      trunk_per_s, trunk_per_core: examples the trunk's fwd+bwd consumes per second (wall)
        and per CPU-second;
      input_over_trunk_per_core: how many trunk cores one input core can feed;
      cores_to_feed: cores the pipeline needs to keep up with the trunk at its wall speed.
    """
    input_per_core = examples / samples["input"].cpu_s
    trunk_per_s = examples / samples["trunk"].wall_s
    trunk_per_core = examples / samples["trunk"].cpu_s
    return {
        "input_per_core": input_per_core,
        "trunk_per_s": trunk_per_s,
        "trunk_per_core": trunk_per_core,
        "input_over_trunk_per_core": input_per_core / trunk_per_core,
        "cores_to_feed": trunk_per_s / input_per_core,
    }


@contextlib.contextmanager
def opencv_threads(count: int) -> Iterator[None]:
    """OpenCV's thread count inside the block (as one extractor worker has), then restored."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def clip_frames(frames: int, size: tuple[int, int]) -> list[tuple[int, np.ndarray]]:
    """The first `frames` frames of the bundled clip, resized to `size` (width, height):
    [(frame number, RGB uint8 [height, width, 3])]."""
    numbered = list(itertools.islice(video.read_frames(sample_clip_path()), frames))
    return [(number, cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if size[0] < rgb.shape[1]
                                else cv2.INTER_LINEAR)) for number, rgb in numbered]


def extractor_rates(frames: int, rounds: int) -> dict[str, dict[str, float]]:
    """Frames/s of the motion-mask extractor (default MaskSettings, at the frames' own size)
    on one OpenCV thread, at each of EXTRACTOR_SIZES, in interleaved rounds.

    Returns:
      'WxH' -> {'frames_per_s': wall-time median, 'frames_per_core': per CPU-second median,
      'frames': frames per pass, 'masked': frames that kept a mask}.
    """
    settings = MaskSettings(max_side=None)
    inputs = {f"{w}x{h}": clip_frames(frames, (w, h)) for w, h in EXTRACTOR_SIZES}
    kept = {}

    def extract(name: str):
        def run() -> None:
            kept[name] = sum(m.drop is None for m in masks_from_frames(inputs[name], settings))
        return run

    with opencv_threads(1):
        samples = interleaved_rounds({name: extract(name) for name in inputs}, rounds, calls=1, warmup=0)
    rates = {}
    for name, frame_list in inputs.items():
        count = len(frame_list)
        rates[name] = {
            "frames_per_s": float(np.median([count / s.wall_s for s in samples[name]])),
            "frames_per_core": float(np.median([count / s.cpu_s for s in samples[name]])),
            "frames": count,
            "masked": kept[name],
        }
    return rates
