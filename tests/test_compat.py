import os
import subprocess
import sys


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
    assert result.returncode == 0, result.stderr
    assert "BatchNorm/moving_variance" in result.stdout
    assert "BatchNorm/gamma" in result.stdout


def test_compat_selects_legacy_keras_for_tf1_style_tracking():
    from mtss_train import compat

    assert compat.tf.keras is compat.tf_keras or compat.tf.keras.__name__.startswith("tf_keras")
    assert callable(compat.track_tf1_style_variables)


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
