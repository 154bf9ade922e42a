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
