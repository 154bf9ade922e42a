"""What a run tells its user: the console progress line, TensorBoard scalars and pictures.

Step results stay on the device until a report needs them: `Reporter.record` only queues
them, and `flush` fetches the queue at once (one host sync per report, not per step),
checking every value for NaN/Inf before anything is logged or saved.
"""

import datetime
import math
import time
from typing import Callable, Sequence

from absl import logging

from mtss_train.compat import tf
from mtss_train.errors import MtssError
from mtss_train.train.steps import Results


class TrainingError(MtssError):
    """Training cannot go on (e.g. a non-finite loss)."""


class WeightedMeans:
    """Sums fetched step results ({metric: (sum of weighted values, sum of weights)}), so a
    mean over any number of steps weighs each example as one, whatever its batch held."""

    def __init__(self):
        self._sums: dict[str, list[float]] = {}

    def add(self, results: dict[str, tuple[float, float]]) -> None:
        for key, (num, den) in results.items():
            total = self._sums.setdefault(key, [0.0, 0.0])
            total[0] += num
            total[1] += den

    def means(self) -> dict[str, float]:
        """Weighted means; a metric that had no weight in what was added is left out."""
        return {k: num / den for k, (num, den) in self._sums.items() if den > 0}


class Meter:
    """A task's summed results, examples and own step time since the last reset."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.results = WeightedMeans()
        self.steps = 0
        self.examples = 0
        self.seconds = 0.0

    def add(self, results: dict[str, tuple[float, float]], examples: int, seconds: float) -> None:
        self.results.add(results)
        self.steps += 1
        self.examples += examples
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        """Weighted means; a metric that had no weight in the window is left out."""
        return self.results.means()

    def examples_per_sec(self) -> float:
        """Examples over this task's own step time (input wait included), not shared wall time."""
        return self.examples / max(self.seconds, 1e-9)

    def describe(self) -> str:
        means = " ".join(f"{k} {v:.3f}" for k, v in self.means().items())
        return f"{means} ({self.steps} steps, {self.examples_per_sec():.1f} ex/s)"


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class Reporter:
    """Queues step results; logs progress and writes TensorBoard summaries on request.

    Args:
      task_names: the tasks of the run.
      batch_sizes: global examples per step of each task.
      fetch: turns a step's device Results into host floats.
      writer: TensorBoard writer (a no-op writer on non-chief workers).
      max_steps: for the ETA.
    """

    def __init__(self, task_names: Sequence[str], batch_sizes: dict[str, int],
                 fetch: Callable[[Results], dict[str, tuple[float, float]]],
                 writer: tf.summary.SummaryWriter, max_steps: int):
        self.batch_sizes = batch_sizes
        self.fetch = fetch
        self.writer = writer
        self.max_steps = max_steps
        self.console = {name: Meter() for name in task_names}
        self.tensorboard = {name: Meter() for name in task_names}
        self._pending: list[tuple[int, str, Results, float]] = []
        self._console_start = self._tensorboard_start = time.perf_counter()
        self._rate_start: tuple[int, float] | None = None

    def record(self, step: int, task_name: str, results: Results, seconds: float) -> None:
        """Queues the Results of global step `step` (1-based), which took `seconds`."""
        if self._rate_start is None:
            self._rate_start = (step - 1, time.perf_counter() - seconds)
        self._pending.append((step, task_name, results, seconds))

    def flush(self, last_checkpoint: str | None, keep: int = 0) -> None:
        """Fetches queued results into the meters, but those of the newest `keep` steps
        (steps that may still run remotely: fetching them would wait for them).

        Raises:
          TrainingError: at the first non-finite value, naming its task and step and the
            last good checkpoint (nothing is saved after it).
        """
        newest = self._pending[-1][0] if self._pending else 0
        ready = [entry for entry in self._pending if entry[0] <= newest - keep]
        self._pending = self._pending[len(ready):]
        for step, name, results, seconds in ready:
            values = self.fetch(results)
            if not all(math.isfinite(x) for pair in values.values() for x in pair):
                raise TrainingError(
                    f"non-finite {name} loss/metrics {self._means(values)} at step {step}; stopped without "
                    f"saving, the last good checkpoint is {last_checkpoint or 'none (no checkpoint yet)'}"
                )
            for meters in (self.console, self.tensorboard):
                meters[name].add(values, self.batch_sizes[name], seconds)

    @staticmethod
    def _means(values: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {k: num / den if den else float("nan") for k, (num, den) in values.items()}

    def log_progress(self, step: int, skipped: int) -> None:
        """The console line: each task's means and rate, overall rate, ETA, skipped inputs."""
        start_step, start_time = self._rate_start or (step, time.perf_counter())
        steps_per_sec = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
        examples = sum(m.examples for m in self.console.values())
        overall = examples / max(time.perf_counter() - self._console_start, 1e-9)
        logging.info(
            "step %d/%d  %s  | %.2f steps/s, %.1f ex/s, eta %s, skipped inputs %d", step, self.max_steps,
            "  ".join(f"{n}: {m.describe()}" for n, m in self.console.items() if m.steps),
            steps_per_sec, overall, duration((self.max_steps - step) / steps_per_sec) if steps_per_sec else "?",
            skipped,
        )
        for meter in self.console.values():
            meter.reset()
        self._console_start = time.perf_counter()

    def write_summaries(self, step: int, scalars: dict[str, float | tf.Tensor],
                        pictures: dict[str, dict[str, tf.Tensor]], histograms: dict[str, tf.Tensor]) -> None:
        """Per-task means and rates, the run's own `scalars` and `histograms`, and pictures
        ({group: {name: [K, H, W, 3] in [0, 1]}}, tagged group/name)."""
        examples = sum(m.examples for m in self.tensorboard.values())
        with self.writer.as_default(step=step):
            for name, meter in self.tensorboard.items():
                for key, value in meter.means().items():
                    tf.summary.scalar(f"train/{name}/{key}", value)
                if meter.steps:
                    tf.summary.scalar(f"train/{name}/examples_per_sec", meter.examples_per_sec())
                meter.reset()
            tf.summary.scalar("train/examples_per_sec", examples / max(time.perf_counter() - self._tensorboard_start, 1e-9))
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
            for tag, values in histograms.items():
                tf.summary.histogram(tag, values)
            for name, images in pictures.items():
                for key, image in images.items():
                    tf.summary.image(f"{name}/{key}", image, max_outputs=4)
        self._tensorboard_start = time.perf_counter()

    def write_evaluation(self, step: int, results: dict[str, dict[str, float]], where: str) -> None:
        with self.writer.as_default(step=step):
            for name, metrics in results.items():
                for key, value in metrics.items():
                    tf.summary.scalar(f"eval/{name}/{key}", value)
        logging.info("eval at step %d on %s: %s", step, where, "  ".join(
            f"{n}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()) for n, m in results.items()
        ))
