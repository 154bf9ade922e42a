"""The optimizer and learning-rate schedule a TrainConfig asks for."""

from mtss_train.compat import tf_keras
from mtss_train.config import TrainConfig


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
        optimizer = tf_keras.optimizers.RMSprop(
            rate, rho=config.rmsprop_decay, momentum=config.momentum,
            epsilon=config.rmsprop_epsilon, **clip,
        )
    else:
        optimizer = tf_keras.optimizers.SGD(rate, momentum=config.momentum, **clip)
    if config.precision == "float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer
