"""The per-task step functions under a tf.distribute strategy.

A step returns its results as device tensors: every metric (the loss included) as a
(numerator, denominator) pair summed over the global batch, so means over any number of
steps and replicas are exact, also for weighted metrics whose weights may be all zero in a
batch. Nothing here reads a value on the host: the caller fetches results when it reports,
so a runner whose steps run remotely (ParameterServerStrategy's RemoteValues) fits the
same loop by overriding `run`, `fetch` and `wait` (`RemoteStepRunner`).
"""

import collections
import contextlib
from typing import Callable, Iterator, NamedTuple, Sequence

from mtss_train.compat import tf, tf_keras
from mtss_train.errors import MtssError
from mtss_train.train.setting_errors import explained, op_message
from mtss_train.model.multitask import MultiTaskModel
from mtss_train.train.balance import REGULARIZATION, TOTAL, Balance, summed
from mtss_train.train.optim import PerTaskOptimizers
from mtss_train.task import Batch, Metric

# name -> (sum of weighted values, sum of weights) over the global batch.
Results = dict[str, tuple[tf.Tensor, tf.Tensor]]
LOSS = "loss"


def _sums(values: Metric) -> tuple[tf.Tensor, tf.Tensor]:
    """(Σ values·weights, Σ weights) of a per-example metric on this replica."""
    values, weights = values if isinstance(values, tuple) else (values, None)
    values = tf.cast(values, tf.float32)
    weights = tf.ones_like(values) if weights is None else tf.cast(weights, tf.float32)
    return tf.reduce_sum(values * weights), tf.reduce_sum(weights)


class StepRunner:
    """Compiles and runs each task's training, evaluation and picture steps.

    Args:
      strategy: the tf.distribute strategy the model and optimizer were built under.
      model: the multi-task model.
      optimizer: applies the gradients (a LossScaleOptimizer scales float16 losses).
      trainable_scopes: restrict training to variables under these name prefixes.
      balance: how a step of several tasks combines them (`balance.Balance`); None: the
        sum of their weighted losses, and no gradient cosines.
      per_task: the tasks' own optimizers of the trunk (`--optimizer_state per_task`).
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: MultiTaskModel,
                 optimizer: tf_keras.optimizers.Optimizer, trainable_scopes: Sequence[str] = (),
                 balance: Balance | None = None, per_task: PerTaskOptimizers | None = None):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.trainable_scopes = tuple(trainable_scopes)
        self.balance = balance
        self.per_task = per_task
        self.loss_scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        self._compiled: dict[tuple[str, object], Callable] = {}

    def _replica_results(self, task_name: str, batch: Batch, training: bool) -> tuple[tf.Tensor, Results]:
        """(this replica's share of the global mean loss, Results on this replica)."""
        task = self.model.tasks[task_name]
        per_example, metrics = task.loss(self.model(task_name, batch, training=training), batch)
        if LOSS in metrics:
            raise MtssError(f"task {task_name!r} returns a metric named {LOSS!r}, which is the training "
                            "loss's name; rename the metric")
        per_example = tf.cast(per_example, tf.float32)
        share = tf.nn.compute_average_loss(per_example, global_batch_size=task.config.batch_size)
        return share, {LOSS: _sums(per_example), **{k: _sums(v) for k, v in metrics.items()}}

    def _train_replica(self, task_names: tuple[str, ...], diagnose: bool) -> Callable[[dict[str, Batch]], dict[str, Results]]:
        variables = self.model.trainable_variables(task_names, self.trainable_scopes)
        if not variables:
            raise MtssError(f"--trainable_scopes {list(self.trainable_scopes)} select no variable of {task_names}")
        trunk = {id(v) for v in self.model.trunk.trainable_variables}
        shared = [v for v in variables if id(v) in trunk]
        # A plain sum of the losses takes one backward pass; the balance is asked only when it
        # does more, so a run without one steps exactly as it did before balancing existed.
        balanced = (self.balance is not None and len(task_names) > 1 and bool(shared)
                    and (self.balance.name != "none" or diagnose))

        def replica_step(batches: dict[str, Batch]) -> dict[str, Results]:
            results, shares = {}, {}
            with tf.GradientTape(persistent=balanced) as tape:
                regularization = tf.nn.scale_regularization_loss(self.model.regularization_loss(task_names))
                for name in task_names:
                    share, results[name] = self._replica_results(name, batches[name], training=True)
                    shares[name] = self.model.tasks[name].config.loss_weight * share
                if balanced:
                    targets = {TOTAL: self.balance.total(shares, regularization), REGULARIZATION: regularization,
                               **shares}
                else:
                    targets = {TOTAL: summed(shares, regularization)}
                if self.loss_scaled:
                    targets = {key: self.optimizer.get_scaled_loss(value) for key, value in targets.items()}

            def gradient(key: str, sources: Sequence[tf.Variable]) -> list:
                found = tape.gradient(targets[key], sources)
                return self.optimizer.get_unscaled_gradients(found) if self.loss_scaled else found

            if balanced:  # The balance sums the gradients over the replicas itself.
                pairs = self.balance.update(gradient, shares, variables, shared, self.optimizer.iterations, diagnose)
                self.optimizer.apply_gradients(pairs, skip_gradients_aggregation=True)
            elif self.per_task is not None:  # One task per step (config.validate).
                self.per_task.apply(self.optimizer, task_names[0], gradient(TOTAL, variables), variables, trunk)
            else:
                self.optimizer.apply_gradients(zip(gradient(TOTAL, variables), variables))
            return results

        return replica_step

    def _distributed(self, replica_fn: Callable) -> Callable:
        @tf.function
        def step(batch):
            results = self.strategy.run(replica_fn, args=(batch,))
            return tf.nest.map_structure(lambda v: self.strategy.reduce("SUM", v, axis=None), results)

        return step

    def _get(self, kind: str, key: object, make: Callable[[], Callable]) -> Callable:
        if (kind, key) not in self._compiled:
            self._compiled[kind, key] = make()
        return self._compiled[kind, key]

    def train_step(self, task_names: tuple[str, ...], diagnose: bool = False
                   ) -> Callable[[dict[str, Batch]], dict[str, Results]]:
        """The compiled training step of one task, or of several balanced by `balance`:
        {name: distributed batch} -> {name: Results}. `diagnose`: a step of several tasks
        also records the cosines between their trunk gradients (`Balance.cosines`)."""
        diagnose = diagnose and len(task_names) > 1 and self.balance is not None
        return self._get("train", (task_names, diagnose),
                         lambda: self._distributed(self._train_replica(task_names, diagnose)))

    def eval_step(self, task_name: str) -> Callable[[Batch], Results]:
        """Results of a task in inference mode (BN moving statistics), no update."""
        return self._get("eval", task_name, lambda: self._distributed(
            lambda batch: self._replica_results(task_name, batch, training=False)[1]))

    def run(self, task_names: Sequence[str], batches: dict[str, Batch], diagnose: bool = False) -> dict[str, Results]:
        """One training step of `task_names` on their distributed batches (`diagnose`: see
        `train_step`)."""
        return self.train_step(tuple(task_names), diagnose)(batches)

    def pictures(self, task_name: str, batch: Batch) -> dict[str, tf.Tensor]:
        """The task's TensorBoard pictures for (this worker's first replica's part of) a batch,
        plus what the trunk sees when harmonization changed it."""
        task = self.model.tasks[task_name]

        def pictures_of(local: Batch) -> dict[str, tf.Tensor]:
            shown = dict(task.image_summaries(local, self.model(task_name, local, training=False)))
            if self.model.harmonized(task_name):
                shown["trunk_input"] = self.model.trunk_images(task_name, local)[:4] / 255.0
            return shown

        compiled = self._get("pictures", task_name, lambda: tf.function(pictures_of))
        return compiled(self.strategy.experimental_local_results(batch)[0])

    @property
    def lag(self) -> int:
        """Steps that may still be running after `run` returns (none: steps here run in order)."""
        return 0

    def wait(self) -> None:
        """Returns when every step run so far has been applied (at once: they have)."""

    @staticmethod
    def fetch(results: Results) -> dict[str, tuple[float, float]]:
        """Results as host floats; the only place a step's values leave the device."""
        return {k: (float(num), float(den)) for k, (num, den) in results.items()}


class RemoteResults(NamedTuple):
    """One task's Results of a step scheduled on a parameter-server worker, not yet fetched."""

    remote: tf.distribute.experimental.coordinator.RemoteValue
    task_name: str


class RemoteStepRunner(StepRunner):
    """Schedules the training steps on the workers of a ParameterServerStrategy.

    `run` takes per-worker iterators (each worker draws its own batches) and returns at
    once; the worker that picks the step up applies its update to the parameter servers
    asynchronously. At most `in_flight_per_worker` steps per worker (of the cluster's
    `workers`) are queued: the coordinator then waits for the oldest, so progress, ETA and
    saves follow the steps that ran, not the ones scheduled. Evaluation and pictures run on
    the coordinator.

    A step's error surfaces at a later call (the next `run`, `fetch` or `wait`): it is
    reported naming the tasks of every step then in flight. Results of a step whose worker
    died after it finished are lost (the update was applied): `fetch` returns none.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: MultiTaskModel,
                 optimizer: tf_keras.optimizers.Optimizer, trainable_scopes: Sequence[str] = (),
                 *, workers: int, in_flight_per_worker: int = 2):
        super().__init__(strategy, model, optimizer, trainable_scopes)
        self.coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
        self._in_flight: collections.deque[tuple[object, tuple[str, ...]]] = collections.deque(
            maxlen=in_flight_per_worker * workers)

    @property
    def lag(self) -> int:
        """Steps that may still be running after `run` returns."""
        return self._in_flight.maxlen

    def per_worker_iterator(self, dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]
                            ) -> tf.distribute.experimental.coordinator.PerWorkerValues:
        """Iterators over `dataset_fn`'s dataset, made and read on each worker, for `run`."""
        return iter(self.coordinator.create_per_worker_dataset(
            lambda: self.strategy.distribute_datasets_from_function(dataset_fn)))

    def _scheduled(self, task_names: tuple[str, ...]) -> Callable:
        step = self.train_step(task_names)
        return tf.function(lambda iterators: step({name: next(iterators[name]) for name in task_names}))

    @contextlib.contextmanager
    def _reported(self) -> Iterator[None]:
        """Out-of-memory and invalid-argument errors name the tasks of the steps in flight;
        a lost parameter server is one MtssError."""
        names = sorted({name for _, task_names in self._in_flight for name in task_names}) or sorted(self.model.tasks)
        with explained([self.model.tasks[name] for name in names], "in a step on a parameter-server worker"):
            try:
                yield
            except tf.errors.UnavailableError as e:
                raise MtssError(f"lost the connection to a parameter server ({op_message(e)}); the variables live "
                                "there, so training stops: the same command resumes from the last checkpoint") from None

    def run(self, task_names: Sequence[str], iterators: dict[str, object], diagnose: bool = False
            ) -> dict[str, RemoteResults]:
        """Schedules one training step of `task_names`; `iterators`: per-worker iterators.
        No balancing runs here (the trainer refuses it), so `diagnose` changes nothing."""
        names = tuple(task_names)
        function = self._get("scheduled", names, lambda: self._scheduled(names))
        with self._reported():
            if len(self._in_flight) == self._in_flight.maxlen:
                self._results(self._in_flight[0][0])  # Waits for the oldest step.
            remote = self.coordinator.schedule(function, args=({name: iterators[name] for name in names},))
        self._in_flight.append((remote, names))
        return {name: RemoteResults(remote, name) for name in names}

    def eval_step(self, task_name: str) -> Callable[[Batch], Results]:
        """Results of a task in inference mode, on the coordinator."""
        return self._get("eval", task_name, lambda: tf.function(
            lambda batch: self._replica_results(task_name, batch, training=False)[1]))

    def wait(self) -> None:
        """Returns when every scheduled step has run."""
        with self._reported():
            self.coordinator.join()
        self._in_flight.clear()

    def _results(self, remote: tf.distribute.experimental.coordinator.RemoteValue) -> dict | None:
        """A finished step's values, None if they were lost with the worker that held them."""
        try:
            return remote.fetch()
        except tf.errors.UnavailableError:
            return None

    def fetch(self, results: Results | RemoteResults) -> dict[str, tuple[float, float]]:
        """Host floats of a task's results ({} if lost with their worker)."""
        if not isinstance(results, RemoteResults):
            return StepRunner.fetch(results)
        with self._reported():
            values = self._results(results.remote)
        return {} if values is None else StepRunner.fetch(values[results.task_name])
