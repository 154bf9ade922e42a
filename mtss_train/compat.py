"""Makes tf_slim 1.1.0 work on current TensorFlow 2, and holds every private TensorFlow and
tf-keras API the project uses; import it before tf_slim.

Two things changed under tf_slim since its last release:

* TensorFlow's `tensorflow/python/layers/normalization.py` lazily imports
  `tf_keras.legacy_tf_layers.normalization`, but tf-keras moved that package to
  `tf_keras.src.legacy_tf_layers`, so `slim.batch_norm` fails with
  "No module named 'tf_keras.legacy_tf_layers'". We alias the old module names to the new
  modules (the same module objects, so classes stay identical).
* `tf.keras` means Keras 3 unless TF_USE_LEGACY_KERAS=1, and only legacy Keras has
  `tf.compat.v1.keras.utils.track_tf1_style_variables`, which runs slim code in TF2 with
  slim variable names. TensorFlow reads the variable lazily, so setting it here is enough
  even after `import tensorflow`, as long as `tf.keras` has not been touched yet.

Every module of this project that uses tf_slim imports it from here: `from mtss_train.compat
import slim, tf`. Delete the aliasing once tf_slim ships a release that imports cleanly.

Private APIs. Nothing else in the project touches a private TensorFlow or tf-keras name;
the wrappers at the end of this module do, each saying why no public API serves. A new
TensorFlow or tf-keras may drop any of them without notice: tests/test_compat.py checks
that each still exists and behaves as relied on and names the API when it does not, and
pyproject.toml caps both packages below the first minor version that has not been tested.
"""

import importlib
import os
import sys

# The one piece of process-wide state the library sets: without it nothing works (above).
# Log levels and warning filters are the programs' business (mtss_train.startup).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# Private: tf_keras.src.legacy_tf_layers (see the module docstring).
_MOVED_MODULES = ("legacy_tf_layers", "legacy_tf_layers.normalization")
for _name in _MOVED_MODULES:
    sys.modules.setdefault(
        f"tf_keras.{_name}", importlib.import_module(f"tf_keras.src.{_name}")
    )

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tf_slim as slim  # noqa: E402
from tf_keras.src.mixed_precision import autocast_variable as _autocast_variable  # noqa: E402

if not hasattr(tf.compat.v1.keras.utils, "track_tf1_style_variables"):
    raise ImportError(
        "tf.keras was resolved to Keras 3 before mtss_train.compat set "
        "TF_USE_LEGACY_KERAS=1; set TF_USE_LEGACY_KERAS=1 in the environment or import "
        "mtss_train before using tf.keras."
    )

track_tf1_style_variables = tf.compat.v1.keras.utils.track_tf1_style_variables


def autocast(variable: tf.Variable) -> tf.Variable:
    """`variable` (float32) behind Keras' mixed-precision wrapper: read inside a Keras
    layer's call under a float16 or bfloat16 policy, it yields the compute dtype; its dtype,
    handle, updates and checkpoint entry stay those of the float32 variable.

    Private: `tf_keras.src.mixed_precision.autocast_variable.create_autocast_variable`.
    Keras wraps the weights a layer creates with `add_weight` this way, but slim creates its
    variables with `tf.compat.v1.get_variable`, and tf-keras exports no wrapper for those.
    """
    return _autocast_variable.create_autocast_variable(variable)


def rmsprop_slots(optimizer: tf_keras.optimizers.RMSprop, variable: tf.Variable) -> tuple[tf.Variable, tf.Variable]:
    """The (mean square, momentum) slot variables of `variable` in a built tf-keras RMSprop
    with momentum > 0 (without momentum it has no momentum slots).

    Private: `Optimizer._index_dict`, `Optimizer._var_key`, `RMSprop._velocities` and
    `RMSprop._momentums`. tf-keras optimizers have no public slot lookup (the legacy ones had
    `get_slot`), and `_var_key` is what maps the variable an update step receives (a replica's
    component under tf.distribute, an AutoCastVariable) to the one the slots were built for.
    """
    index = optimizer._index_dict[optimizer._var_key(variable)]  # noqa: SLF001
    return optimizer._velocities[index], optimizer._momentums[index]  # noqa: SLF001


def dataset_graph_def(dataset: tf.data.Dataset) -> tf.compat.v1.GraphDef:
    """The GraphDef that builds `dataset`, with the functions its transformations run
    (map, filter, interleave, ...) in its function library.

    Private: `tf.data.Dataset._as_serialized_graph`. TensorFlow has no public way to see the
    ops inside a dataset; `mtss_train.data.in_graph` looks for Python callbacks among them,
    which cannot run on a parameter-server worker.
    """
    return tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())  # noqa: SLF001


__all__ = ["autocast", "dataset_graph_def", "rmsprop_slots", "slim", "tf", "tf_keras", "track_tf1_style_variables"]
