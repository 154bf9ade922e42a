"""The multi-task trainer: alternates task steps on the shared trunk, checkpoints, logs.

Each global step picks one task (round robin, or weighted sampling seeded by the step, so
the schedule needs no state beyond the step), pulls that task's batch, and applies the
gradient of its loss (plus weight decay of the trunk and its head) to the trunk and its
head. One tf.function per task, since batch shapes differ between tasks.
"""

import datetime
import functools
import itertools
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np
from absl import logging

from mtss_train import checkpoints, trunk
from mtss_train.compat import tf, tf_keras
from mtss_train.config import TrainConfig, build_tasks, write_config
from mtss_train.data.images import ImageSource, image_source
from mtss_train.errors import MtssError
from mtss_train.model import MultiTaskModel
from mtss_train.slim_layer import slim_name
from mtss_train.task import Batch, Task

GLOBAL_STEP = "global_step"
OPTIMIZER_SCOPE = "optimizer/"
# Images with a shorter side are skipped (and counted) as too small to crop from.
MIN_IMAGE_SIDE = 32
# Evaluation draws the same batches every time: a fixed seed, apart from training seeds.
EVAL_SEED = 2**31 - 1


class TrainingError(MtssError):
    """Training cannot go on (e.g. a non-finite loss)."""


class TaskSchedule:
    """Which task trains at each global step: a pure function of (step, seed)."""

    def __init__(self, names: Sequence[str], mode: str, weights: Sequence[float] | None, seed: int):
        self.names = list(names)
        self.mode = mode
        weights = np.asarray(weights if weights is not None else [1.0] * len(names), np.float64)
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def task_at(self, step: int) -> str:
        if self.mode == "round_robin":
            return self.names[step % len(self.names)]
        rng = np.random.default_rng([self.seed, step])
        return self.names[rng.choice(len(self.names), p=self.probabilities)]


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def make_learning_rate(config: TrainConfig) -> float | tf_keras.optimizers.schedules.LearningRateSchedule:
    """The configured learning rate: a constant or a schedule of the global step."""
    schedules = tf_keras.optimizers.schedules
    rate = config.learning_rate
    if config.lr_schedule == "cosine":
        rate = schedules.CosineDecay(
            0.0 if config.warmup_steps else rate,
            decay_steps=max(1, config.max_steps - config.warmup_steps),
            warmup_target=rate if config.warmup_steps else None,
            warmup_steps=config.warmup_steps,
        )
    elif config.lr_schedule == "step":  # x0.1 at 1/2 and 3/4 of training.
        bounds = [config.max_steps // 2, 3 * config.max_steps // 4]
        rate = schedules.PiecewiseConstantDecay(bounds, [rate, rate * 0.1, rate * 0.01])
    return rate


def make_optimizer(config: TrainConfig) -> tf_keras.optimizers.Optimizer:
    rate = make_learning_rate(config)
    clip = {"global_clipnorm": config.clip_norm} if config.clip_norm > 0 else {}
    if config.optimizer == "rmsprop":
        return tf_keras.optimizers.RMSprop(
            rate, rho=config.rmsprop_decay, momentum=config.momentum,
            epsilon=config.rmsprop_epsilon, **clip,
        )
    return tf_keras.optimizers.SGD(rate, momentum=config.momentum, **clip)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


class StopSignals:
    """Context: SIGTERM/SIGINT only record themselves, so the loop can stop between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool):
        # Python only delivers signals to the main thread; elsewhere keep default handling.
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def _record(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum)

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Builds everything from a TrainConfig; `train()` runs until `max_steps`.

    Args:
      config: the run's settings.
      eval_images: held-out images; if given, every checkpoint is followed by an
        evaluation on `eval_batches` fixed batches of each task (`eval/...` summaries).
    """

    def __init__(self, config: TrainConfig, eval_images: ImageSource | None = None, eval_batches: int = 10):
        config.validate()
        self.config = config
        self.tasks = build_tasks(config)
        self.strategy = make_strategy(config.strategy)
        self.chief = is_chief(self.strategy)
        self.schedule = TaskSchedule(
            [t.name for t in self.tasks], config.schedule, config.task_weights, config.seed
        )
        self.images = image_source(config.data, min_side=MIN_IMAGE_SIDE)
        if config.init_checkpoint:
            checkpoints.resolve(config.init_checkpoint)  # Fails now, not after building.
        self.eval_images = eval_images
        self.eval_batches = eval_batches
        with self.strategy.scope():
            self.model = MultiTaskModel(
                self.tasks, config.trunk_size, config.output_stride,
                config.weight_decay, config.batch_norm_decay,
                dtype_policy="float32" if config.precision == "float32" else f"mixed_{config.precision}",
            )
            self.optimizer = make_optimizer(config)
            # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
            self.loss_scaled = config.precision == "float16"
            if self.loss_scaled:
                self.optimizer = tf_keras.mixed_precision.LossScaleOptimizer(self.optimizer)
        self.summary_dir = os.path.join(config.train_dir, "logs")
        self._start_step: int | None = None  # Set once variables exist and are restored.
        self.stopped_by: signal.Signals | None = None
        self._eval_steps: dict[str, Callable] = {}

    # -- data ---------------------------------------------------------------------------
    def _distributed_dataset(self, task: Task, images: ImageSource, seed: int):
        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            shard = (context.num_input_pipelines, context.input_pipeline_id)
            batch = context.get_per_replica_batch_size(task.config.batch_size)
            return task.make_dataset(images.dataset(seed, shard), batch, seed)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _iterators(self, start_step: int) -> dict[str, Iterator]:
        # Reseeded by the start step, so a resumed run draws new images and pairs.
        return {
            task.name: iter(self._distributed_dataset(task, self.images, self.config.seed + 1009 * i + start_step))
            for i, task in enumerate(self.tasks)
        }

    # -- state --------------------------------------------------------------------------
    def state_variables(self) -> dict[str, tf.Variable]:
        """Everything a checkpoint holds, by name: model, global step, optimizer slots."""
        state = self.model.variables_by_name()
        state[GLOBAL_STEP] = self.optimizer.iterations
        for variable in self.optimizer.variables():
            if variable is not self.optimizer.iterations:
                state[OPTIMIZER_SCOPE + slim_name(variable)] = variable
        return state

    def _prepare(self, batches: dict[str, Batch]) -> int:
        """Once: creates every variable and restores them (see `_restore`); returns the step."""
        if self._start_step is None:
            self._build(batches)
            self._start_step = self._restore()
        return self._start_step

    def _build(self, batches: dict[str, Batch]) -> None:
        """Creates every variable: the model by one forward pass per task, optimizer slots."""
        for task in self.tasks:
            local = self.strategy.experimental_local_results(batches[task.name])[0]
            with self.strategy.scope():
                self.model(task.name, local, training=False)
        with self.strategy.scope():
            self.optimizer.build(
                [v for t in self.tasks for v in self.model.trainable_variables(t.name)]
            )

    def _checkpoint_step(self) -> int:
        """The global step of the checkpoint a resume would start from (0 if none)."""
        latest = checkpoints.latest(self.config.train_dir)
        if latest is None or GLOBAL_STEP not in checkpoints.read_specs(latest):
            return 0
        return int(checkpoints.read_tensors(latest, [GLOBAL_STEP])[GLOBAL_STEP])

    def _restore(self) -> int:
        """Resumes from train_dir, else warm-starts from init_checkpoint; returns the step."""
        config = self.config
        latest = checkpoints.latest(config.train_dir)
        if latest:
            if config.init_checkpoint:
                logging.info("resuming from %s; --init_checkpoint is ignored", latest)
            report = checkpoints.restore_variables(
                self.state_variables(), latest, required_scopes=trunk.TRUNK_SCOPES + (GLOBAL_STEP,)
            )
            logging.info("resumed from %s at step %d:\n%s", latest,
                         int(self.optimizer.iterations.numpy()), report.format())
        elif config.init_checkpoint:
            # A warm start that misses trunk weights is a wrong checkpoint, not a fresh start.
            required = [s for s in trunk.TRUNK_SCOPES if not s.startswith(tuple(config.exclude_scopes))]
            report = checkpoints.restore_variables(
                self.model.variables_by_name(), config.init_checkpoint,
                exclude_scopes=config.exclude_scopes, required_scopes=required,
            )
            logging.info("warm start from %s:\n%s", config.init_checkpoint, report.format())
        return int(self.optimizer.iterations.numpy())

    def save(self, step: int) -> str | None:
        # Every worker reads (sync-on-read BN statistics all-reduce); only the chief writes.
        values = {name: v.read_value() for name, v in self.state_variables().items()}
        if not self.chief:
            return None
        return checkpoints.save(self.config.train_dir, values, step, self.config.keep_checkpoints)

    # -- steps --------------------------------------------------------------------------
    def _replica_results(self, task_name: str, batch: Batch, training: bool) -> dict[str, tf.Tensor]:
        """'loss' and the task's metrics, each a replica's share of the global batch mean."""
        task = self.model.tasks[task_name]
        outputs = self.model(task_name, batch, training=training)
        per_example, metrics = task.loss(outputs, batch)
        return {
            key: tf.nn.compute_average_loss(tf.cast(values, tf.float32), global_batch_size=task.config.batch_size)
            for key, values in {"loss": per_example, **metrics}.items()
        }

    def _distributed(self, replica_fn: Callable) -> Callable:
        @tf.function
        def step(batch: Batch) -> dict[str, tf.Tensor]:
            results = self.strategy.run(replica_fn, args=(batch,))
            return {k: self.strategy.reduce("SUM", v, axis=None) for k, v in results.items()}

        return step

    def _make_train_step(self, task_name: str) -> Callable:
        task = self.model.tasks[task_name]
        variables = self.model.trainable_variables(task_name, self.config.trainable_scopes)
        if not variables:
            raise MtssError(f"--trainable_scopes {self.config.trainable_scopes} select no variable of {task_name}")

        def replica_step(batch: Batch) -> dict[str, tf.Tensor]:
            with tf.GradientTape() as tape:
                results = self._replica_results(task_name, batch, training=True)
                decay = tf.nn.scale_regularization_loss(self.model.regularization_loss(task_name))
                total = task.config.loss_weight * results["loss"] + decay
                if self.loss_scaled:
                    total = self.optimizer.get_scaled_loss(total)
            gradients = tape.gradient(total, variables)
            if self.loss_scaled:
                gradients = self.optimizer.get_unscaled_gradients(gradients)
            self.optimizer.apply_gradients(zip(gradients, variables))
            return results

        return self._distributed(replica_step)

    def _make_image_summary(self, task_name: str) -> Callable:
        task = self.model.tasks[task_name]

        @tf.function
        def images(batch: Batch) -> dict[str, tf.Tensor]:
            return task.image_summaries(batch, self.model(task_name, batch, training=False))

        return images

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, images: ImageSource, batches: int, seed: int = EVAL_SEED) -> dict[str, dict[str, float]]:
        """Mean loss and metrics of each task on `batches` fixed batches from `images`.

        Inference mode (BN moving statistics). A Trainer that has not trained yet restores
        its train_dir (or init_checkpoint) first.
        """
        if self._start_step is None:
            self._prepare({t.name: next(iter(self._distributed_dataset(t, images, seed))) for t in self.tasks})
        results: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            dataset = self._distributed_dataset(task, images, seed)
            if task.name not in self._eval_steps:
                self._eval_steps[task.name] = self._distributed(
                    functools.partial(self._replica_results, task.name, training=False)
                )
            sums: dict[str, float] = {}
            for batch in itertools.islice(dataset, batches):
                for key, value in self._eval_steps[task.name](batch).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            results[task.name] = {k: v / batches for k, v in sums.items()}
        return results

    def _evaluate_and_log(self, step: int, writer: tf.summary.SummaryWriter) -> None:
        results = self.evaluate(self.eval_images, self.eval_batches)
        with writer.as_default(step=step):
            for task_name, metrics in results.items():
                for key, value in metrics.items():
                    tf.summary.scalar(f"eval/{task_name}/{key}", value)
        logging.info("eval at step %d on %s: %s", step, self.eval_images.path, "  ".join(
            f"{n}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()) for n, m in results.items()
        ))

    # -- loop ---------------------------------------------------------------------------
    def train(self) -> str | None:
        """Trains to max_steps; returns the last checkpoint prefix."""
        config = self.config
        try:
            os.makedirs(config.train_dir, exist_ok=True)
        except OSError as e:
            raise MtssError(f"cannot create --train_dir {config.train_dir}: {e.strerror}") from None
        iterators = self._iterators(self._checkpoint_step())
        pending = {t.name: next(iterators[t.name]) for t in self.tasks}
        step = start = self._prepare(pending)
        if self.chief:
            write_config(config, self.tasks, os.path.join(config.train_dir, "flags.json"))
        train_steps = {t.name: self._make_train_step(t.name) for t in self.tasks}
        image_summaries = {t.name: self._make_image_summary(t.name) for t in self.tasks}
        writer = tf.summary.create_file_writer(self.summary_dir) if self.chief else tf.summary.create_noop_writer()
        progress = {t.name: Meter() for t in self.tasks}
        window = {t.name: Meter() for t in self.tasks}
        last_saved = checkpoints.latest(config.train_dir)
        saved_step = start
        started = time.perf_counter()
        logging.info("training %s from step %d to %d", ", ".join(self.schedule.names), step, config.max_steps)
        # Workers of a multi-worker job could see a signal at different steps and then wait
        # on each other's checkpoint reads forever; they rely on the periodic checkpoints.
        stop = StopSignals(enabled=not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy))
        with stop:
            while step < config.max_steps and not stop.received:
                name = self.schedule.task_at(step)
                batch = pending.pop(name) if name in pending else next(iterators[name])
                results = {k: float(v) for k, v in train_steps[name](batch).items()}
                step += 1
                if not all(math.isfinite(v) for v in results.values()):
                    raise TrainingError(
                        f"non-finite {name} loss/metrics {results} at step {step}; stopped without "
                        f"saving, the last good checkpoint is {last_saved or 'none (no checkpoint yet)'}"
                    )
                for meters in (progress, window):
                    meters[name].add(results, self.model.tasks[name].config.batch_size)
                last = step == config.max_steps or stop.received
                if step % config.log_every_steps == 0 or last:
                    rate = (step - start) / (time.perf_counter() - started)
                    logging.info(
                        "step %d/%d  %s  | %.2f steps/s, eta %s, skipped images %d", step, config.max_steps,
                        "  ".join(f"{n}: {m.describe()}" for n, m in progress.items() if m.window_steps),
                        rate, _duration((config.max_steps - step) / rate), self.images.skipped.count,
                    )
                    for meter in progress.values():
                        meter.reset_window()
                if step % config.summary_every_steps == 0 or last:
                    with writer.as_default(step=step):
                        self._write_summaries(window, image_summaries[name], name, batch)
                if step % config.save_every_steps == 0 or last:
                    last_saved, saved_step = self.save(step) or last_saved, step
                    if self.eval_images is not None and not stop.received:
                        self._evaluate_and_log(step, writer)
            if stop.received and step != saved_step:  # The signal came after this step's checks.
                last_saved, saved_step = self.save(step) or last_saved, step
        writer.flush()
        if stop.received:
            self.stopped_by = stop.received
            logging.warning("%s: stopped at step %d after saving %s; the same command resumes",
                            stop.received.name, step, last_saved)
        return last_saved

    def _write_summaries(self, meters: dict[str, "Meter"], image_summary: Callable, name: str, batch: Batch) -> None:
        for task_name, meter in meters.items():
            for key, value in meter.means().items():
                tf.summary.scalar(f"train/{task_name}/{key}", value)
            if meter.window_steps:
                tf.summary.scalar(f"train/{task_name}/examples_per_sec", meter.examples_per_sec())
            meter.reset_window()
        tf.summary.scalar("train/learning_rate", self.optimizer.learning_rate)  # At the current step.
        tf.summary.scalar("data/skipped_images", self.images.skipped.count)
        local = self.strategy.experimental_local_results(batch)[0]
        for key, images in image_summary(local).items():
            tf.summary.image(f"{name}/{key}", images, max_outputs=4)


class Meter:
    """Running means of a task's step results, and its example rate, over a window."""

    def __init__(self):
        self.reset_window()

    def reset_window(self) -> None:
        self.sums: dict[str, float] = {}
        self.window_steps = 0
        self.window_examples = 0
        self.window_start = time.perf_counter()

    def add(self, results: dict[str, float], examples: int) -> None:
        for key, value in results.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.window_steps += 1
        self.window_examples += examples

    def means(self) -> dict[str, float]:
        return {k: v / self.window_steps for k, v in self.sums.items()} if self.window_steps else {}

    def examples_per_sec(self) -> float:
        return self.window_examples / max(time.perf_counter() - self.window_start, 1e-9)

    def describe(self) -> str:
        return " ".join(f"{k} {v:.3f}" for k, v in self.means().items()) + f" ({self.examples_per_sec():.1f} ex/s)"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


def describe_outputs(train_dir: str, checkpoint: str | None, summary_dir: str) -> str:
    """Where the results are and commands to look at them that work from this shell."""
    python = _runnable(sys.executable, "python")
    tensorboard = _runnable(os.path.join(os.path.dirname(sys.executable), "tensorboard"), "tensorboard")
    return "\n".join([
        f"checkpoint:      {checkpoint}",
        f"config:          {os.path.join(train_dir, 'flags.json')}",
        f"TensorBoard:     {summary_dir}   (view: {tensorboard} --logdir {summary_dir})",
        f"inspect weights: {python} -m mtss_train.ckpt ls {train_dir}",
    ])


def _runnable(path: str, name: str) -> str:
    """`name` if the shell finds this very program by it, else its (relative if shorter) path."""
    if shutil.which(name) and os.path.realpath(shutil.which(name)) == os.path.realpath(path):
        return name
    relative = os.path.relpath(path)
    return relative if len(relative) < len(path) and not relative.startswith("..") else path


