"""Makes tf_slim 1.1.0 work on current TensorFlow 2; import it before tf_slim.

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
import slim, tf`. Delete this module once tf_slim ships a release that imports cleanly.
"""

import importlib
import os
import sys

# The one piece of process-wide state the library sets: without it nothing works (above).
# Log levels and warning filters are the programs' business (mtss_train.startup).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

_MOVED_MODULES = ("legacy_tf_layers", "legacy_tf_layers.normalization")
for _name in _MOVED_MODULES:
    sys.modules.setdefault(
        f"tf_keras.{_name}", importlib.import_module(f"tf_keras.src.{_name}")
    )

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tf_slim as slim  # noqa: E402

if not hasattr(tf.compat.v1.keras.utils, "track_tf1_style_variables"):
    raise ImportError(
        "tf.keras was resolved to Keras 3 before mtss_train.compat set "
        "TF_USE_LEGACY_KERAS=1; set TF_USE_LEGACY_KERAS=1 in the environment or import "
        "mtss_train before using tf.keras."
    )

track_tf1_style_variables = tf.compat.v1.keras.utils.track_tf1_style_variables

__all__ = ["slim", "tf", "tf_keras", "track_tf1_style_variables"]
