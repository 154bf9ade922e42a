"""The per-task step functions under a tf.distribute strategy.

A step returns its results as device tensors: every metric (the loss included) as a
(numerator, denominator) pair summed over the global batch, so means over any number of
steps and replicas are exact, also for weighted metrics whose weights may be all zero in a
batch. Nothing here reads a value on the host: the caller fetches results when it reports,
so a runner whose steps run remotely (ParameterServerStrategy's RemoteValues) fits the
same loop by overriding `run` and `fetch`.
"""

from typing import Callable, Sequence

from mtss_train.compat import tf, tf_keras
from mtss_train.errors import MtssError
from mtss_train.model import MultiTaskModel
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
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: MultiTaskModel,
                 optimizer: tf_keras.optimizers.Optimizer, trainable_scopes: Sequence[str] = ()):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.trainable_scopes = tuple(trainable_scopes)
        self.loss_scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        self._compiled: dict[tuple[str, str], Callable] = {}

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

    def _train_replica(self, task_name: str) -> Callable[[Batch], Results]:
        task = self.model.tasks[task_name]
        variables = self.model.trainable_variables(task_name, self.trainable_scopes)
        if not variables:
            raise MtssError(f"--trainable_scopes {list(self.trainable_scopes)} select no variable of {task_name}")

        def replica_step(batch: Batch) -> Results:
            with tf.GradientTape() as tape:
                share, results = self._replica_results(task_name, batch, training=True)
                decay = tf.nn.scale_regularization_loss(self.model.regularization_loss(task_name))
                total = task.config.loss_weight * share + decay
                if self.loss_scaled:
                    total = self.optimizer.get_scaled_loss(total)
            gradients = tape.gradient(total, variables)
            if self.loss_scaled:
                gradients = self.optimizer.get_unscaled_gradients(gradients)
            self.optimizer.apply_gradients(zip(gradients, variables))
            return results

        return replica_step

    def _distributed(self, replica_fn: Callable[[Batch], Results]) -> Callable[[Batch], Results]:
        @tf.function
        def step(batch: Batch) -> Results:
            results = self.strategy.run(replica_fn, args=(batch,))
            return tf.nest.map_structure(lambda v: self.strategy.reduce("SUM", v, axis=None), results)

        return step

    def _get(self, kind: str, task_name: str, make: Callable[[], Callable]) -> Callable:
        if (kind, task_name) not in self._compiled:
            self._compiled[kind, task_name] = make()
        return self._compiled[kind, task_name]

    def train_step(self, task_name: str) -> Callable[[Batch], Results]:
        """The compiled training step of a task: distributed batch -> Results."""
        return self._get("train", task_name, lambda: self._distributed(self._train_replica(task_name)))

    def eval_step(self, task_name: str) -> Callable[[Batch], Results]:
        """Results of a task in inference mode (BN moving statistics), no update."""
        return self._get("eval", task_name, lambda: self._distributed(
            lambda batch: self._replica_results(task_name, batch, training=False)[1]))

    def run(self, task_name: str, batch: Batch) -> Results:
        """One training step of `task_name` on a distributed batch."""
        return self.train_step(task_name)(batch)

    def pictures(self, task_name: str, batch: Batch) -> dict[str, tf.Tensor]:
        """The task's TensorBoard pictures for (this worker's first replica's part of) a batch."""
        task = self.model.tasks[task_name]

        def make() -> Callable:
            return tf.function(lambda local: task.image_summaries(local, self.model(task_name, local, training=False)))

        return self._get("pictures", task_name, make)(self.strategy.experimental_local_results(batch)[0])

    @staticmethod
    def fetch(results: Results) -> dict[str, tuple[float, float]]:
        """Results as host floats; the only place a step's values leave the device."""
        return {k: (float(num), float(den)) for k, (num, den) in results.items()}
