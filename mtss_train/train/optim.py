"""The optimizer and learning-rate schedule a TrainConfig asks for, and the per-task
optimizer state of the trunk (`--optimizer_state per_task`)."""

from typing import Sequence

from mtss_train.compat import rmsprop_slots, tf, tf_keras
from mtss_train.model.slim_layer import slim_name
from mtss_train.train.balance import summed_over_replicas
from mtss_train.train.config import TrainConfig

PER_TASK_SCOPE = "per_task/"  # Under the checkpoint's optimizer scope: optimizer/per_task/<task>/...


class FusedRMSprop(tf_keras.optimizers.RMSprop):
    """tf_keras RMSprop whose dense momentum update is one fused kernel per variable.

    tf_keras spells the update as a dozen element-wise ops, each a pass over the tensor
    in memory; tf_slim's TF1 RMSPropOptimizer runs `ResourceApplyRMSProp`, one pass, and
    the difference was a good part of why our step was slower than bare slim's. Both
    compute the same update, epsilon inside the square root:

        ms  = rho * ms + (1 - rho) * g^2
        mom = momentum * mom + lr * g / sqrt(ms + epsilon)
        var = var - mom

    The slots are the parent's, names and zero start included (TF1 starts ms at one), so
    checkpoints and training runs stay as they were. The kernel has no centered variant
    and needs a momentum slot, and sparse gradients would have to be scattered; those
    cases take the parent's path.
    """

    def update_step(self, gradient: tf.Tensor | tf.IndexedSlices, variable: tf.Variable) -> None:
        if isinstance(gradient, tf.IndexedSlices) or self.momentum <= 0 or self.centered:
            super().update_step(gradient, variable)
            return
        mean_square, momentum_slot = rmsprop_slots(self, variable)
        dtype = variable.dtype  # An AutoCastVariable's dtype and handle are its float32 variable's.
        tf.raw_ops.ResourceApplyRMSProp(
            var=variable.handle, ms=mean_square.handle, mom=momentum_slot.handle,
            lr=tf.cast(self.learning_rate, dtype), rho=tf.cast(self.rho, dtype),
            momentum=tf.cast(self.momentum, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=gradient, use_locking=False)


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


class _AtGlobalStep(tf_keras.optimizers.schedules.LearningRateSchedule):
    """A schedule read at the global step, whatever the optimizer's own iteration count."""

    def __init__(self, schedule: tf_keras.optimizers.schedules.LearningRateSchedule, global_step: tf.Variable):
        self.schedule = schedule
        self.global_step = global_step

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        del step  # A task's optimizer counts that task's steps only.
        return self.schedule(self.global_step)

    def get_config(self) -> dict:
        return {"schedule": self.schedule.get_config()}


def make_optimizer(config: TrainConfig, global_step: tf.Variable | None = None) -> tf_keras.optimizers.Optimizer:
    """RMSProp (the paper's) or momentum SGD; float16 compute adds dynamic loss scaling,
    since float16 gradients underflow without it (bfloat16 has float32's range).
    `global_step`: the learning rate follows it rather than this optimizer's iterations.
    Under `--optimizer_state per_task` no optimizer clips: `PerTaskOptimizers.apply` clips
    the whole step's gradients at once."""
    rate = make_learning_rate(config)
    if global_step is not None and callable(rate):
        rate = _AtGlobalStep(rate, global_step)
    clipped = config.clip_norm > 0 and config.optimizer_state == "shared"
    clip = {"global_clipnorm": config.clip_norm} if clipped else {}
    if config.optimizer == "rmsprop":
        optimizer = FusedRMSprop(
            rate, rho=config.rmsprop_decay, momentum=config.momentum,
            epsilon=config.rmsprop_epsilon, **clip,
        )
    else:
        optimizer = tf_keras.optimizers.SGD(rate, momentum=config.momentum, **clip)
    if config.precision == "float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


class PerTaskOptimizers:
    """`--optimizer_state per_task`: each task's steps move the trunk with an optimizer of
    their own, so one task's gradient scale (col's cross-entropy over 313 bins, ex's
    triplets) never sets another's step sizes through shared RMSProp accumulators. Heads,
    which only their own task's steps train, stay with the model optimizer, whose
    iteration count is the global step and whose learning rate every task's follows.

    Checkpoint names: `optimizer/per_task/<task>/<slot>/<variable>` and
    `optimizer/per_task/<task>/iterations` (the steps that task trained). Create under the
    strategy's scope.
    """

    def __init__(self, config: TrainConfig, task_names: Sequence[str], global_step: tf.Variable):
        self.clip_norm = config.clip_norm
        self.by_task = {name: make_optimizer(config, global_step) for name in task_names}

    def build(self, trunk_variables: Sequence[tf.Variable]) -> None:
        for optimizer in self.by_task.values():
            optimizer.build(trunk_variables)

    def checkpoint_variables(self, scope: str) -> dict[str, tf.Variable]:
        """Each task's step count and slots, by checkpoint name under `scope` + per_task/."""
        named = {}
        for name, optimizer in self.by_task.items():
            prefix = f"{scope}{PER_TASK_SCOPE}{name}/"
            named[prefix + "iterations"] = optimizer.iterations
            named.update({prefix + slim_name(v): v for v in optimizer.variables() if v is not optimizer.iterations})
        return named

    def apply(self, model_optimizer: tf_keras.optimizers.Optimizer, task_name: str,
              gradients: Sequence[tf.Tensor | None], variables: Sequence[tf.Variable], trunk_ids: set[int]) -> None:
        """Applies one task's step (in the replica function): its trunk gradients with its
        own optimizer, the rest with `model_optimizer`, after summing them over the replicas
        in one all-reduce and clipping them together, as one optimizer would."""
        connected = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        # Dense: an all-reduce needs one shape on every replica (see balance.Balance.update).
        summed = summed_over_replicas([tf.convert_to_tensor(g) for g, _ in connected])
        if self.clip_norm > 0:
            summed, _ = tf.clip_by_global_norm(summed, self.clip_norm)
        pairs = [(g, v) for g, (_, v) in zip(summed, connected)]
        trunk = [(g, v) for g, v in pairs if id(v) in trunk_ids]
        rest = [(g, v) for g, v in pairs if id(v) not in trunk_ids]
        # The trunk's first: its learning rate reads the global step, which the model
        # optimizer's apply advances.
        if trunk:
            self.by_task[task_name].apply_gradients(trunk, skip_gradients_aggregation=True)
        if rest:
            model_optimizer.apply_gradients(rest, skip_gradients_aggregation=True)
        else:
            model_optimizer.iterations.assign_add(1)
