"""What the trainer is measured against: a plain tf_slim TF1-graph step, and matmul peak.

The slim step is what a slim user would otherwise run: `resnet_v2_101` through block3
built in a `tf.Graph` with `tf.compat.v1`, a trivial head (the mean of block3) plus slim's
weight decay, `tf.compat.v1.train.RMSPropOptimizer` with the trainer's defaults, and the
BatchNorm moving averages updated through UPDATE_OPS. Its graph also gives the FLOPs of a
trunk step (TensorFlow's cost analysis), and a large float32 matmul measured in the same
run gives the machine's practical peak FLOP/s.
"""

from typing import Callable

import numpy as np

from mtss_train.model import trunk
from mtss_train.compat import slim, tf
from mtss_train.log_levels import quieted
from mtss_train.train.config import TrainConfig


class SlimStep:
    """One training step of the plain slim graph: `step()` runs it (fwd + bwd + RMSProp).

    Args:
      images: [N, H, W, 3] RGB in [0, 255], the batch every step trains on (held in a
        graph variable, so steps copy nothing in).
      trunk_size: '101' or 'tiny' (see `trunk.trunk_blocks`).
      config: learning rate, RMSProp and weight-decay settings, as the trainer's.
    """

    def __init__(self, images: np.ndarray, trunk_size: str, config: TrainConfig):
        self.graph = tf.Graph()
        # Building a TF1 graph (and its cost analysis) logs deprecation notices that say
        # nothing about the measurement.
        with self.graph.as_default(), quieted("tensorflow", "ERROR"):
            held = tf.compat.v1.get_variable(
                "benchmark_images", initializer=tf.constant(images, tf.float32), trainable=False,
                collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES])
            with slim.arg_scope(trunk.trunk_arg_scope(config.weight_decay, config.batch_norm_decay)):
                block3, _ = trunk.resnet_v2_101_block3(
                    trunk.vgg_preprocess(held), is_training=True, blocks=trunk.trunk_blocks(trunk_size))
            self.forward_ops = list(self.graph.get_operations())
            loss = tf.reduce_mean(block3) + tf.add_n(tf.compat.v1.losses.get_regularization_losses())
            optimizer = tf.compat.v1.train.RMSPropOptimizer(
                config.learning_rate, decay=config.rmsprop_decay, momentum=config.momentum,
                epsilon=config.rmsprop_epsilon)
            # The BN moving averages live in UPDATE_OPS; a slim step must run them.
            with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
                self.train_op = optimizer.minimize(loss, tf.compat.v1.train.get_or_create_global_step())
            init = [tf.compat.v1.global_variables_initializer(), tf.compat.v1.local_variables_initializer()]
        self.session = tf.compat.v1.Session(graph=self.graph)
        self.session.run(init)

    def step(self) -> None:
        self.session.run(self.train_op)

    def close(self) -> None:
        self.session.close()

    def step_flops(self) -> float:
        """Floating-point operations of one step by TensorFlow's cost analysis (the
        registered per-op statistics: convolutions and their gradients, matmuls, ...)."""
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        with quieted("tensorflow", "ERROR"):  # Deprecation notices, as in __init__.
            return float(tf.compat.v1.profiler.profile(self.graph, options=options).total_float_ops)

    def forward_conv_flops(self) -> float:
        """2 x multiply-adds of the forward convolutions, from their static shapes.

        A step costs about three times this (forward, gradient of the input, gradient of the
        filter), less the first convolution's input gradient, which nothing needs.
        """
        total = 0.0
        for op in self.forward_ops:
            if op.type != "Conv2D":
                continue
            out_shape = op.outputs[0].shape.as_list()  # [N, H', W', C_out]
            kernel = op.inputs[1].shape.as_list()  # [kh, kw, C_in, C_out]
            total += 2.0 * np.prod(out_shape) * kernel[0] * kernel[1] * kernel[2]
        return total


def matmul_contender(size: int, repeats: int = 1) -> tuple[Callable[[], tf.Tensor], float]:
    """(a call doing `repeats` chained float32 [size, size] matmuls, its FLOPs).

    Chained (each product feeds the next), so none can be merged away; the right factor
    has variance 1/size, so values stay of order one. Give a call about a step's FLOPs and
    it sees the same load as the step it is compared with.
    """
    generator = tf.random.Generator.from_seed(0)
    a = generator.normal([size, size])
    b = generator.normal([size, size], stddev=size**-0.5)

    @tf.function
    def chained() -> tf.Tensor:
        x = a
        for _ in range(repeats):
            x = tf.linalg.matmul(x, b)
        return x

    return chained, 2.0 * size**3 * repeats
