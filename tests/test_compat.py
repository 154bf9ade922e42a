"""mtss_train.compat: tf_slim on current TensorFlow, and every private TensorFlow / tf-keras
API the project relies on, each checked here so an upgrade that drops or changes one fails
with the API's name and the installed versions."""

import contextlib
import os
import subprocess
import sys
from typing import Callable, Iterator

import numpy as np
import pytest

from mtss_train import compat, startup
from mtss_train.compat import tf, tf_keras


@contextlib.contextmanager
def relied_on(api: str) -> Iterator[None]:
    """Turns any error inside into a test failure that names the private `api`."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  Whatever the upgrade broke, say which API it was.
        pytest.fail(f"{api} is gone or no longer behaves as mtss_train.compat relies on, under tensorflow "
                    f"{tf.__version__} and tf-keras {tf_keras.__version__}: {type(e).__name__}: {e}; "
                    "adapt mtss_train/compat.py (or keep the versions pyproject.toml allows)", pytrace=False)


@pytest.mark.slow
def test_slim_batch_norm_builds_in_a_fresh_interpreter_after_compat():
    # A fresh process: the fix must work when compat is the first thing imported.
    code = (
        "import sys, mtss_train.compat as c\n"
        "import tf_keras.src.legacy_tf_layers as moved\n"
        "assert sys.modules['tf_keras.legacy_tf_layers'] is moved\n"
        "g = c.tf.Graph()\n"
        "with g.as_default():\n"
        "    x = c.tf.compat.v1.placeholder(c.tf.float32, [2, 4, 4, 3])\n"
        "    y = c.slim.batch_norm(x, is_training=True, scale=True)\n"
        "names = sorted(v.op.name for v in g.get_collection('variables'))\n"
        "print(names)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    with relied_on("tf_keras.src.legacy_tf_layers (aliased as tf_keras.legacy_tf_layers for slim.batch_norm)"):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "BatchNorm/moving_variance" in result.stdout
        assert "BatchNorm/gamma" in result.stdout


def test_compat_selects_legacy_keras_for_tf1_style_tracking():
    from mtss_train import compat

    assert compat.tf.keras is compat.tf_keras or compat.tf.keras.__name__.startswith("tf_keras")
    assert callable(compat.track_tf1_style_variables)


@pytest.mark.slow
def test_importing_the_library_leaves_log_levels_and_warning_filters_alone():
    code = (
        "import os, warnings\n"
        "import tensorflow\n"
        "environment = dict(os.environ)\n"
        "import mtss_train.train.trainer, mtss_train.tasks, mtss_train.loader\n"
        "added = sorted(set(os.environ) - set(environment))\n"
        "assert added == ['TF_USE_LEGACY_KERAS'], added\n"
        "ours = [f for f in warnings.filters if f[1] is not None and 'layer' in f[1].pattern]\n"
        "assert not ours, ours\n"
        "import mtss_train.startup\n"  # The programs' settings, for contrast.
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '2'\n"
        "assert [f for f in warnings.filters if f[1] is not None and 'layer' in f[1].pattern]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("TF_")})
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_program_loads_no_keras_3():
    """TensorFlow imports, as it loads, the Keras that TF_USE_LEGACY_KERAS names; startup sets
    it first (this process imported startup first, in conftest) so Keras 3 never loads."""
    assert "keras.src" not in sys.modules  # (matplotlib too, but eval.plots imports that when it draws.)


def test_startup_drops_tensorflows_load_notices_but_not_a_cuinit_failure_where_a_driver_is():
    notices = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
               "I0000 00:00:1.0    2624 port.cc:153] oneDNN custom operations are on. You may see ...\n")
    no_driver = "I0000 00:00:1.1    2624 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n"
    cuinit = "E0000 00:00:1.2    2624 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: (303)\n"
    real = "E0000 00:00:1.3    2624 some_op.cc:9] a real error\nTraceback (most recent call last):\n"
    for printed, shown in ((notices + no_driver + cuinit + real, real), (notices + cuinit + real, cuinit + real)):
        keep = startup.TensorFlowLoadNotices().keep
        assert "".join(line for line in printed.splitlines(keepends=True) if keep(line)) == shown


class _Reads(tf_keras.layers.Layer):
    """Returns `read()` from inside a Keras layer's call under `policy`."""

    def __init__(self, read: Callable[[], tf.Tensor], policy: str):
        super().__init__(dtype=policy)
        self._read = read

    def call(self, unused: tf.Tensor) -> tf.Tensor:
        return self._read()


def test_autocast_reads_in_the_compute_dtype_and_stays_a_float32_variable():
    with relied_on("tf_keras.src.mixed_precision.autocast_variable.create_autocast_variable"):
        stored = tf.Variable([1.5, -2.0], name="weights")
        variable = compat.autocast(stored)
        read = _Reads(lambda: variable * 1, "mixed_bfloat16")(tf.zeros([]))
        assert read.dtype == tf.bfloat16  # What slim code computes with under a mixed policy.
        assert (variable * 1).dtype == tf.float32  # Outside a layer's call: float32.
        # FusedRMSprop hands the kernel the handle and casts hyper-parameters to the dtype;
        # checkpoints save it under the wrapped variable's name.
        assert variable.dtype == tf.float32 and variable.handle is stored.handle
        assert variable.name == stored.name
        variable.assign_sub([0.5, 0.5])
        np.testing.assert_array_equal(stored.numpy(), [1.0, -2.5])


def test_rmsprop_slots_are_the_ones_its_update_step_writes():
    with relied_on("tf_keras RMSprop._index_dict / _var_key / _velocities / _momentums"):
        first, second = tf.Variable([1.0, 2.0]), compat.autocast(tf.Variable([3.0, 4.0, 5.0]))
        optimizer = tf_keras.optimizers.RMSprop(0.1, rho=0.9, momentum=0.5, epsilon=1.0)
        optimizer.build([first, second])
        gradient = tf.constant([1.0, -2.0, 3.0])
        optimizer.apply_gradients([(gradient, second)])
        mean_square, momentum = compat.rmsprop_slots(optimizer, second)
        expected_ms = 0.1 * gradient.numpy() ** 2  # (1 - rho) g^2 from zero.
        np.testing.assert_allclose(mean_square.numpy(), expected_ms, rtol=1e-6)
        np.testing.assert_allclose(momentum.numpy(), 0.1 * gradient.numpy() / np.sqrt(expected_ms + 1.0), rtol=1e-6)
        untouched = compat.rmsprop_slots(optimizer, first)  # Each variable its own pair.
        assert [s.shape for s in untouched] == [(2,), (2,)] and not np.any([s.numpy() for s in untouched])


def test_dataset_graph_def_shows_the_ops_inside_a_datasets_functions():
    with relied_on("tf.data.Dataset._as_serialized_graph"):
        python = tf.data.Dataset.range(3).map(lambda x: tf.numpy_function(lambda v: v * 2, [x], tf.int64))
        graph = compat.dataset_graph_def(python)
        assert isinstance(graph, tf.compat.v1.GraphDef)
        assert {"RangeDataset", "MapDataset"} <= {node.op for node in graph.node}
        inside = {node.op for function in graph.library.function for node in function.node_def}
        assert "PyFunc" in inside  # The trainer warns of such a pipeline under parameter_server (data.in_graph.calls_python).
        plain = compat.dataset_graph_def(tf.data.Dataset.range(3).map(lambda x: x * 2))
        assert "Mul" in {node.op for function in plain.library.function for node in function.node_def}
