"""SavedModel export: loads with plain TensorFlow in a fresh process and matches the loader."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files
from mtss_train import export, loader
from mtss_train.compat import tf
from mtss_train.errors import MtssError
from conftest import assert_one_line_error, cli_env, run_cli

# What a user without mtss_train runs: plain TensorFlow, the documented signatures.
PLAIN_TF_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
outputs = {
    "serving_default": model.signatures["serving_default"](images=tf.constant(images))["block3"],
    "float_rgb": model.signatures["float_rgb"](images=tf.constant(images.astype(np.float32)))["block3"],
    "uint8_call": model.uint8_rgb(tf.constant(images))["block3"],
}
np.savez(sys.argv[3], **{k: v.numpy() for k, v in outputs.items()})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mtss_train", "tf_slim", "tf_keras"))
print("foreign modules:", loaded)
"""


@pytest.fixture(scope="module")
def trained_tiny_checkpoint(tmp_path_factory):
    """A tiny trunk with non-trivial BN statistics, so a model ignoring them would differ."""
    tf.random.set_seed(11)
    layer = loader.trunk_layer("tiny")
    rng = np.random.default_rng(0)
    for name, variable in layer.variables_by_name().items():
        if "moving_" in name:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(np.float32))
    return checkpoint_files.save(str(tmp_path_factory.mktemp("run")), layer.variables_by_name(), step=4)


@pytest.mark.slow
def test_saved_model_matches_the_loader_in_a_process_without_mtss_train(trained_tiny_checkpoint, tmp_path):
    result = run_cli("mtss_train.export", "--checkpoint", trained_tiny_checkpoint, "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    assert "SavedModel:" in result.stdout and "tiny trunk, stride 32" in result.stdout
    images = np.random.default_rng(1).integers(0, 256, [3, 70, 100, 3], dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in cli_env().items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    plain = subprocess.run([sys.executable, "-c", PLAIN_TF_SCRIPT, str(tmp_path / "model"),
                            str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
                           capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300, check=False)
    assert plain.returncode == 0, plain.stderr
    assert "foreign modules: []" in plain.stdout

    expected = loader.load_feature_extractor(trained_tiny_checkpoint, "tiny")(images).numpy()
    assert expected.shape == (3, 3, 4, 128)
    scale = np.abs(expected).max()
    with np.load(tmp_path / "out.npz") as outputs:
        for name in ("serving_default", "float_rgb", "uint8_call"):
            # Same ops in both; graph rewrites may round differently: stated tolerance.
            np.testing.assert_allclose(outputs[name] / scale, expected / scale, atol=export.TOLERANCE, err_msg=name)
    info = json.loads((tmp_path / "model" / export.INFO_FILE).read_text())
    assert info["trunk_size"] == "tiny" and info["output_stride"] == 32 and info["max_deviation"] <= export.TOLERANCE


@pytest.mark.slow
def test_atrous_export_keeps_its_stride_and_reports_it(trained_tiny_checkpoint, tmp_path):
    absl_level = logging.getLogger("absl").level
    info = export.export_saved_model(trained_tiny_checkpoint, str(tmp_path / "m16"), output_stride=16)
    # Quieted while saving, then as before: not pinned at the level it had in effect.
    assert logging.getLogger("absl").level == absl_level
    model = tf.saved_model.load(str(tmp_path / "m16"))
    block3 = model.signatures["float_rgb"](images=tf.zeros([1, 64, 96, 3]))["block3"]
    assert block3.shape == (1, 4, 6, 128) and info["output_stride"] == 16
    assert sorted(os.listdir(tmp_path)) == ["m16"]  # No temporary directory left behind.


def test_export_refuses_a_non_empty_directory_and_leaves_nothing_on_failure(trained_tiny_checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(MtssError, match="not empty"):
        export.export_saved_model(trained_tiny_checkpoint, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    with pytest.raises(MtssError, match="required variable"):
        export.export_saved_model(trained_tiny_checkpoint, str(tmp_path / "wrong"), size="101")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


@pytest.mark.slow
def test_export_command_bad_checkpoint_is_one_error_line(tmp_path):
    result = run_cli("mtss_train.export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "m"))
    assert_one_line_error(result, "missing does not exist")
    assert not (tmp_path / "m").exists()
