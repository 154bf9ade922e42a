"""The optimizer and learning-rate schedule a TrainConfig asks for."""

from mtss_train.compat import rmsprop_slots, tf, tf_keras
from mtss_train.train.config import TrainConfig


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


def make_optimizer(config: TrainConfig) -> tf_keras.optimizers.Optimizer:
    """RMSProp (the paper's) or momentum SGD; float16 compute adds dynamic loss scaling,
    since float16 gradients underflow without it (bfloat16 has float32's range)."""
    rate = make_learning_rate(config)
    clip = {"global_clipnorm": config.clip_norm} if config.clip_norm > 0 else {}
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
