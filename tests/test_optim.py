"""FusedRMSprop: the fused kernel updates exactly as tf_keras RMSprop does (issue 17)."""

import os
import subprocess
import sys

from typing import Callable

import numpy as np
import pytest

from conftest import cli_env
from mtss_train.compat import autocast, tf, tf_keras
from mtss_train.train.optim import FusedRMSprop

FUSED_OP = "ResourceApplyRMSProp"
SHAPES = [(3, 3, 4, 8), (8,), (6, 5)]


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(17)
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


class Reads(tf_keras.layers.Layer):
    """Reads variables inside a Keras layer's call, as the model does: under a mixed
    policy, a float32 variable behind `autocast` reads in the compute dtype."""

    def __init__(self, read: Callable[[], list[tf.Tensor]], compute_dtype: tf.DType):
        super().__init__(dtype="float32" if compute_dtype == tf.float32 else f"mixed_{compute_dtype.name}")
        self._read = read

    def call(self, unused: tf.Tensor) -> list[tf.Tensor]:
        return self._read()


def train(optimizer: tf_keras.optimizers.Optimizer, steps: int = 6, compute_dtype: tf.DType = tf.float32,
          sparse: bool = False, strategy: tf.distribute.Strategy | None = None) -> tuple[list[np.ndarray], set[str]]:
    """Variables and slots after `steps` updates from fixed weights on fixed gradients, and
    the op types of the compiled step. With `sparse`, the last variable is read by
    tf.gather, so its gradient is IndexedSlices (with a repeated row)."""
    strategy = strategy or tf.distribute.get_strategy()
    rng = np.random.default_rng(18)
    gradients = [[tf.constant(rng.normal(size=shape).astype(np.float32)) for shape in SHAPES] for _ in range(steps)]
    mixed = compute_dtype != tf.float32
    with strategy.scope():
        variables = [tf.Variable(value) for value in initial_weights()]
        if mixed:  # As slim_layer stores mixed-precision weights: float32 behind a cast on read.
            variables = [autocast(v) for v in variables]
        optimizer.build(variables)
    reader = Reads(lambda: [v * 1 for v in variables[:-1]]
                   + [tf.gather(variables[-1], [0, 2, 2, 5]) if sparse else variables[-1] * 1], compute_dtype)

    def replica_step(step_gradients: list[tf.Tensor]) -> None:
        with tf.GradientTape() as tape:
            *reads, last = reader(tf.zeros([]))
            assert {read.dtype for read in reads + [last]} == {compute_dtype}  # Mixed: low-precision reads.
            upstream = step_gradients[:-1] + [tf.gather(step_gradients[-1], [0, 2, 2, 5]) if sparse
                                              else step_gradients[-1]]
            loss = sum(tf.reduce_sum(tf.cast(read, tf.float32) * g) for read, g in zip(reads + [last], upstream))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    @tf.function
    def step(step_gradients: list[tf.Tensor]) -> None:
        strategy.run(replica_step, args=(step_gradients,))

    for step_gradients in gradients:
        step(step_gradients)
    ops = {op.type for op in step.get_concrete_function(gradients[0]).graph.get_operations()}
    state = variables + list(optimizer.variables)  # The step counter and the slots.
    for variable in state:  # Every replica holds the same values.
        for local in strategy.experimental_local_results(variable)[1:]:
            np.testing.assert_array_equal(local.numpy(), variable.numpy())
    return [v.numpy() for v in state], ops


def settings(momentum: float = 0.9, centered: bool = False) -> dict:
    schedule = tf_keras.optimizers.schedules.CosineDecay(0.05, decay_steps=10, warmup_target=0.1, warmup_steps=2)
    return dict(learning_rate=schedule, rho=0.9, momentum=momentum, epsilon=1.0, centered=centered)


def assert_same_updates(fused: list[np.ndarray], plain: list[np.ndarray]) -> None:
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", [tf.float32, tf.bfloat16], ids=["float32", "mixed_bfloat16"])
def test_fused_updates_match_tf_keras_rmsprop(compute_dtype):
    fused, fused_ops = train(FusedRMSprop(**settings()), compute_dtype=compute_dtype)
    plain, plain_ops = train(tf_keras.optimizers.RMSprop(**settings()), compute_dtype=compute_dtype)
    assert_same_updates(fused, plain)
    assert FUSED_OP in fused_ops and FUSED_OP not in plain_ops
    assert min(np.abs(a - b).max() for a, b in zip(fused[:len(SHAPES)], initial_weights())) > 0.1  # They moved.


@pytest.mark.parametrize("variant", [dict(momentum=0.0), dict(centered=True)], ids=["no_momentum", "centered"])
def test_what_the_kernel_cannot_do_falls_back_to_tf_keras(variant):
    fused, fused_ops = train(FusedRMSprop(**settings(**variant)))
    plain, _ = train(tf_keras.optimizers.RMSprop(**settings(**variant)))
    assert_same_updates(fused, plain)
    assert FUSED_OP not in fused_ops


def test_sparse_gradients_fall_back_and_dense_ones_stay_fused():
    fused, fused_ops = train(FusedRMSprop(**settings()), sparse=True)
    plain, _ = train(tf_keras.optimizers.RMSprop(**settings()), sparse=True)
    assert_same_updates(fused, plain)
    assert FUSED_OP in fused_ops and "ResourceScatterAdd" in fused_ops  # The sparse path is tf_keras's.


# MirroredStrategy needs its two logical CPUs before TensorFlow starts: a fresh process.
MIRRORED = """
import sys
sys.path.insert(0, sys.argv[1])
from mtss_train.compat import tf, tf_keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from test_optim import FusedRMSprop, assert_same_updates, settings, train, FUSED_OP

for compute_dtype in (tf.float32, tf.bfloat16):
    fused, ops = train(FusedRMSprop(**settings()), compute_dtype=compute_dtype,
                       strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    plain, _ = train(tf_keras.optimizers.RMSprop(**settings()), compute_dtype=compute_dtype,
                     strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    assert_same_updates(fused, plain)
    assert FUSED_OP in ops
    print("matched", compute_dtype.name)
"""


@pytest.mark.slow
def test_fused_updates_match_under_mirrored_strategy_on_two_cpus():
    run = subprocess.run([sys.executable, "-c", MIRRORED, os.path.dirname(__file__)], capture_output=True,
                         text=True, timeout=600, env=cli_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["matched", "float32", "matched", "bfloat16"]
