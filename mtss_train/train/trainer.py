"""The multi-task trainer: alternates task steps on the shared trunk, checkpoints, reports.

Each global step picks one task (round robin, or weighted sampling seeded by the step, so
the schedule needs no state beyond the step), pulls that task's batch, and applies the
gradient of its loss (plus weight decay of the trunk and its head) to the trunk and its
head. The pieces: `TrainingState` (model, optimizer, checkpoints), `StepRunner` (the
compiled per-task steps under the strategy), `Reporter` (progress line, TensorBoard).

Under a ParameterServerStrategy this process is the coordinator: a `RemoteStepRunner`
schedules the steps on the workers, which read their own batches; building, pictures,
evaluation and checkpoints happen here, on batches this process makes.
"""

import contextlib
import itertools
import os
import signal
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from absl import logging

from mtss_train.ckpt import checkpoint_files
from mtss_train.train import inputs
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig, build_tasks, write_config
from mtss_train.data.images import ReadOptions
from mtss_train.data.source import Source
from mtss_train.model.trunk import vgg_preprocess
from mtss_train.train.distribution import (devices_in_use, is_chief, is_multi_worker, is_parameter_server,
                                           make_strategy, parameter_server_cluster, signal_vote, worker_count)
from mtss_train.errors import CheckpointError, MtssError, ctrl_c_pressed
from mtss_train.train.setting_errors import explained
from mtss_train.train.reporting import Reporter, WeightedMeans
from mtss_train.train.state import TrainingState
from mtss_train.train.steps import RemoteStepRunner, StepRunner
from mtss_train.train.train_dir_lock import TrainDirLock

# Evaluation draws the same batches every time: a fixed seed, apart from training seeds.
EVAL_SEED = 2**31 - 1


class TaskSchedule:
    """Which tasks train at each global step: a pure function of (step, seed).

    'round_robin' and 'weighted' pick one task per step; 'all' trains every task each step.
    """

    def __init__(self, names: Sequence[str], mode: str, weights: Sequence[float] | None, seed: int):
        self.names = list(names)
        self.mode = mode
        weights = np.asarray(weights if weights is not None else [1.0] * len(names), np.float64)
        if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
            raise MtssError(f"task weights must be finite, non-negative and not all zero, got {list(weights)}")
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def tasks_at(self, step: int) -> list[str]:
        if self.mode == "all":
            return list(self.names)
        if self.mode == "round_robin":
            return [self.names[step % len(self.names)]]
        rng = np.random.default_rng([self.seed, step])
        return [self.names[rng.choice(len(self.names), p=self.probabilities)]]


class StopSignals:
    """Context: SIGTERM/SIGINT only record themselves, so the loop can stop between steps.

    A worker of a multi-worker job that stopped alone would leave the others waiting for it
    in the next all-reduce. There `vote` (distribution.signal_vote) makes a signal count
    only once the workers agree on it: `check` runs the vote every `every` steps and at the
    last one, so they all stop at the same step, on the largest signal number any received.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, vote: Callable[[int], dict[signal.Signals, int]] | None = None, every: int = 1):
        # Python only delivers signals to the main thread; elsewhere keep default handling.
        self.enabled = threading.current_thread() is threading.main_thread()
        self.received: signal.Signals | None = None
        self.agreed: dict[signal.Signals, int] = {}  # Workers per signal, at the last check.
        self._vote = vote
        self._every = every
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

    def check(self, step: int, last: bool) -> None:
        """Every worker calls this after each step: the vote is a collective."""
        if self._vote is not None and (step % self._every == 0 or last):
            self.agreed = self._vote(int(self.received or 0))

    @property
    def requested(self) -> signal.Signals | None:
        """The signal to stop on: this process's own, or the one the workers agreed on."""
        if self._vote is None:
            return self.received
        return max(self.agreed) if self.agreed else None


class EvalPicture(Protocol):
    """A picture of the trunk the chief writes to TensorBoard after every evaluation."""

    def write(self, writer: tf.summary.SummaryWriter, step: int, block3: Callable[[tf.Tensor], tf.Tensor]) -> None:
        """Writes its summaries at `step`; `block3`: RGB images in [0, 255] -> block3, inference mode."""


class Trainer:
    """Builds everything from a TrainConfig; `train()` runs until `max_steps`.

    Sources are opened (and fail on bad paths) at construction; variables are created and
    restored by `prepare()`, which `train()` and `evaluate()` call when needed.
    """

    def __init__(self, config: TrainConfig, cluster: tf.distribute.cluster_resolver.ClusterResolver | None = None,
                 eval_picture_makers: Sequence[Callable[[], EvalPicture | None]] = ()):
        """`cluster`: a parameter-server job's cluster, if the caller has read TF_CONFIG
        already (`distribution.parameter_server_cluster`); read here otherwise.
        `eval_picture_makers`: each makes a picture the chief draws after every evaluation,
        or None (the program passes the evaluation layer's, e.g. `mtss_train.eval.neighbours`);
        called by the chief only, so the other workers never read the pictures' images."""
        config.validate()
        self.config = config
        self.tasks = build_tasks(config)
        # The strategy coordinates this cluster, and the remote runner queues steps by its
        # worker count (the strategy has no public way to say it).
        if config.strategy == "parameter_server" and cluster is None:
            cluster = parameter_server_cluster()
        self.strategy = make_strategy(config.strategy, cluster)
        self.devices = devices_in_use(self.strategy, cluster)
        self.chief = is_chief(self.strategy)
        self.remote = is_parameter_server(self.strategy)
        inputs.check_batch_sizes(self.tasks, self.strategy.num_replicas_in_sync)
        self.schedule = TaskSchedule([t.name for t in self.tasks], config.schedule, config.task_weights, config.seed)
        options = ReadOptions(config.image_key, config.max_image_pixels)
        self.sources = inputs.open_sources(self.tasks, config.data, options=options)
        self.eval_sources = inputs.open_sources(self.tasks, config.eval_data, eval_split=True, options=options)
        # A parameter-server coordinator's trunk lives on the parameter servers: no pictures of it.
        makers = eval_picture_makers if self.chief and not self.remote else []
        self.eval_pictures = [picture for picture in (make() for make in makers) if picture is not None]
        if config.init_checkpoint:
            checkpoint_files.resolve(config.init_checkpoint)  # Fails now, not after building.
        tf.random.set_seed(config.seed)  # The same --seed gives the same initial weights.
        if config.deterministic:
            # On CPU our ops already repeat exactly (tests/test_determinism.py); this makes GPU
            # kernels choose deterministic algorithms, and any op without one raise.
            tf.config.experimental.enable_op_determinism()
        self.state = TrainingState(config, self.tasks, self.strategy, self.chief)
        self.model = self.state.model
        if self.remote:
            self.runner = RemoteStepRunner(self.strategy, self.model, self.state.optimizer, config.trainable_scopes,
                                           workers=cluster.cluster_spec().num_tasks("worker"))
        else:
            self.runner = StepRunner(self.strategy, self.model, self.state.optimizer, config.trainable_scopes,
                                     self.state.balance, self.state.per_task)
        self.summary_dir = os.path.join(config.train_dir, "logs")
        # Steps that train several tasks together show their balance (weights, gradient cosines);
        # parameter-server workers step apart, so there is no one balance to show (config.validate).
        self._balanced = config.schedule == "all" and len(self.tasks) > 1 and not self.remote
        self.stopped_by: signal.Signals | None = None
        self._local_iterators: dict[str, Iterator] = {}  # Parameter-server runs: batches made here, for pictures.

    def iterators(self, sources: dict[str, Source], seed: int) -> dict[str, Iterator]:
        """Endless batch iterators of the tasks that have a source: distributed, or made in
        this process under a parameter-server strategy (whose workers read their own)."""
        tasks = [t for t in self.tasks if t.name in sources]
        if self.remote:
            return inputs.local_iterators(tasks, sources, seed)
        return inputs.iterators(self.strategy, tasks, sources, seed)

    def prepare(self, batches: dict[str, object] | None = None) -> int:
        """Creates every variable (from `batches` or a batch of each task) and restores them
        once (see `TrainingState.restore`); returns the global step."""
        if not self.state.built:
            if batches is None:
                batches = self.first_batches(self.iterators(self.sources, self.config.seed))
            self.state.build(batches)
            self.state.restore()
        return self.state.step

    def first_batches(self, iterators: dict[str, Iterator]) -> dict[str, object]:
        """One batch of each task, for building; an input too large for memory is an
        MtssError naming the task's settings, not a ResourceExhaustedError."""
        batches = {}
        for task in self.tasks:
            if task.name in iterators:
                with explained([task], "making its first batch"):
                    batches[task.name] = next(iterators[task.name])
        return batches

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, sources: dict[str, Source], batches: int, seed: int = EVAL_SEED) -> dict[str, dict[str, float]]:
        """Mean loss and metrics of each task with a source, over `batches` fixed batches.

        Inference mode (BN moving statistics). A Trainer that has not trained yet restores
        its train_dir (or init_checkpoint) first.
        """
        self.prepare()
        results: dict[str, dict[str, float]] = {}
        for name, iterator in self.iterators(sources, seed).items():
            means = WeightedMeans()
            step = self.runner.eval_step(name)
            for batch in itertools.islice(iterator, batches):
                means.add(self.runner.fetch(step(batch)))
            results[name] = means.means()
        return results

    # -- loop ---------------------------------------------------------------------------
    def train(self) -> str | None:
        """Trains to max_steps; returns the last checkpoint prefix.

        The chief holds the train dir's lock throughout: a second run on it refuses at start.
        """
        writer = None
        with TrainDirLock(self.config.train_dir) if self.chief else contextlib.nullcontext():
            try:
                iterators, first = self._start()
                writer = self._writer()
                return self._loop(iterators, first, writer)
            finally:  # Also after an error: the summaries so far, the inputs skipped so far.
                # Signals wait: the run is ending, and a KeyboardInterrupt from here would
                # read as one during start-up.
                with StopSignals():
                    if writer is not None:
                        writer.flush()
                    for source in {id(s): s for s in self.sources.values()}.values():
                        if source.skipped.count:
                            logging.warning("inputs skipped in %s: %s", source.path, source.skipped.summary())

    def _start(self) -> tuple[dict[str, Iterator], dict[str, object]]:
        """Builds and restores (or warm-starts) the model, writes flags.json; returns the
        training batch iterators and the first batch of each task."""
        config = self.config
        if not self.chief:
            try:
                os.makedirs(config.train_dir, exist_ok=True)
            except OSError as e:
                raise MtssError(f"cannot create --train_dir {config.train_dir}: {e.strerror}") from None
        # Reseeded by the start step, so a resumed run draws new images and pairs.
        start = self.state.step if self.state.built else self.state.checkpoint_step()
        iterators = self.iterators(self.sources, config.seed + start)
        first = self.first_batches(iterators)
        self.prepare(first)
        if self.chief:
            self.state.set_aside_unreadable()
            write_config(config, self.tasks, os.path.join(config.train_dir, "flags.json"))
        if self.remote:
            self._local_iterators = iterators
            iterators = inputs.per_worker_iterators(self.runner.per_worker_iterator, self.tasks, self.sources, config.seed + start)
        return iterators, first

    def _writer(self) -> tf.summary.SummaryWriter:
        if not self.chief:
            return tf.summary.create_noop_writer()
        try:
            return tf.summary.create_file_writer(self.summary_dir)
        except (tf.errors.OpError, OSError) as e:
            raise MtssError(f"cannot write TensorBoard logs in {self.summary_dir}: {e}") from None

    def _save(self, step: int, last_saved: str | None) -> str | None:
        """Checkpoints `step`; a failed write (e.g. a full disk) says what is still intact."""
        self.runner.wait()  # Every scheduled step applied: the checkpoint holds `step` steps.
        try:
            return self.state.save(step) or last_saved
        except CheckpointError as e:
            intact = (f"the previous checkpoint {last_saved} is intact: the same command resumes from it once the "
                      "cause is fixed" if last_saved else "no checkpoint was written yet")
            raise CheckpointError(f"{e}; {intact}") from None

    def _loop(self, iterators: dict[str, Iterator], last_batches: dict[str, object],
              writer: tf.summary.SummaryWriter) -> str | None:
        config = self.config
        step = start = self.state.step
        reporter = Reporter(self.schedule.names, {t.name: t.config.batch_size for t in self.tasks},
                            self.runner.fetch, writer, config.max_steps)
        fresh = set(last_batches)  # Batches drawn to build the model and not trained on yet.
        last_saved = checkpoint_files.latest(config.train_dir)
        saved_step = start
        by_name = {t.name: t for t in self.tasks}
        logging.info("training %s from step %d to %d on %s", ", ".join(self.schedule.names), step, config.max_steps,
                     self.devices)
        multi_worker = is_multi_worker(self.strategy)
        stop = StopSignals(signal_vote(self.strategy), config.stop_check_every_steps) if multi_worker else StopSignals()
        with stop:
            if ctrl_c_pressed():  # While starting, and TensorFlow swallowed the KeyboardInterrupt: no step.
                raise KeyboardInterrupt
            ended = time.perf_counter()
            while step < config.max_steps and not stop.requested:
                # A scheduled remote step returns at once: time it from the previous one.
                began = ended if self.remote else time.perf_counter()
                names = self.schedule.tasks_at(step)
                with explained([by_name[n] for n in names], f"at step {step + 1}"):
                    # The step before a summary measures how the tasks' trunk gradients agree.
                    results = self.runner.run(names, self._step_inputs(names, iterators, last_batches, fresh),
                                              diagnose=(step + 1) % config.summary_every_steps == 0
                                              or step + 1 == config.max_steps)
                step += 1
                ended = time.perf_counter()
                for name in names:
                    reporter.record(step, name, results[name], ended - began)
                stop.check(step, last=step == config.max_steps)
                last = step == config.max_steps or stop.requested
                due = {kind: step % every == 0 or last for kind, every in (
                    ("log", config.log_every_steps), ("summary", config.summary_every_steps),
                    ("save", config.save_every_steps))}
                if any(due.values()):  # A checkpoint waits for every step; a log need not.
                    reporter.flush(last_saved, keep=0 if due["save"] else self.runner.lag)
                if due["log"]:
                    reporter.log_progress(step, inputs.skipped_inputs(self.sources))
                if due["summary"]:
                    self._write_summaries(reporter, step, last_batches)
                if due["save"]:
                    last_saved, saved_step = self._save(step, last_saved), step
                    if self.eval_sources and not stop.requested:
                        reporter.write_evaluation(step, self.evaluate(self.eval_sources, config.eval_batches),
                                                  ", ".join(sorted({s.path for s in self.eval_sources.values()})))
                    for picture in [] if stop.requested else self.eval_pictures:
                        picture.write(reporter.writer, step, self._block3)
                ended = time.perf_counter()  # Reporting is no step's time.
            # The signal came after this step's checks; never so in a multi-worker job, whose
            # workers all stop on a check step, which saves.
            if stop.requested and step != saved_step:
                reporter.flush(last_saved)
                last_saved, saved_step = self._save(step, last_saved), step
        self.stopped_by = stop.requested
        if not multi_worker and stop.requested:
            logging.warning("%s: stopped at step %d after saving %s; the same command resumes",
                            stop.requested.name, step, last_saved)
        elif stop.requested:
            saved = f"after saving {last_saved}" if self.chief else "which the chief saved"
            logging.warning("%s (received by %d of %d workers): every worker stopped at step %d, %s; the same "
                            "command resumes", stop.requested.name, stop.agreed[stop.requested],
                            worker_count(self.strategy), step, saved)
        elif stop.received:  # After the last check: the run had finished.
            logging.warning("%s came after the workers' last stop check; the run finished", stop.received.name)
        return last_saved

    def _step_inputs(self, names: list[str], iterators: dict[str, Iterator], last_batches: dict[str, object],
                     fresh: set[str]) -> dict[str, object]:
        """What a step of `names` takes: their next batches (a task's first batch, drawn to
        build the model, is trained on first), or the per-worker iterators under a
        parameter-server strategy, whose workers draw their own."""
        if self.remote:
            return {name: iterators[name] for name in names}
        for name in names:
            if name in fresh:
                fresh.discard(name)
            else:
                last_batches[name] = next(iterators[name])
        return {name: last_batches[name] for name in names}

    @tf.function(reduce_retracing=True)
    def _block3(self, images: tf.Tensor) -> tf.Tensor:
        """The trunk's block3 of RGB images in [0, 255], in inference mode (for eval_pictures)."""
        return self.model.trunk(vgg_preprocess(images), training=False)[0]

    def _write_summaries(self, reporter: Reporter, step: int, last_batches: dict[str, object]) -> None:
        """Scalars, every task's pictures from its most recent batch (under a parameter-server
        strategy, a new batch made here: the workers' stay there), and the model's own."""
        if self.remote:
            last_batches.update({name: next(iterator) for name, iterator in self._local_iterators.items()})
        scalars = {"train/learning_rate": self.state.optimizer.learning_rate}
        for kind, count in self._skips_by_kind().items():
            scalars[f"data/skipped/{kind}"] = count
        pictures = {name: self.runner.pictures(name, batch) for name, batch in last_batches.items()}
        model_scalars, model_pictures, histograms = self.model.summaries(self.schedule.names)
        balance_scalars, balance_pictures = self.state.balance.summaries() if self._balanced else ({}, {})
        reporter.write_summaries(step, {**scalars, **model_scalars, **balance_scalars},
                                 {**pictures, **model_pictures, **balance_pictures}, histograms)

    def _skips_by_kind(self) -> dict[str, int]:
        kinds = sorted({t.source_kind for t in self.tasks})
        return {kind: inputs.skipped_inputs({t.name: self.sources[t.name] for t in self.tasks if t.source_kind == kind})
                for kind in kinds}
