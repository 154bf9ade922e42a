"""Exports the block3 feature extractor of a checkpoint as a TensorFlow SavedModel.

    python -m mtss_train.export --checkpoint CKPT --out DIR [--trunk_size 101|tiny] [--output_stride 16]

The SavedModel needs nothing of mtss_train (nor tf-slim) to run: VGG preprocessing
(subtracting the ImageNet RGB mean) is inside, BatchNorm is frozen at its moving
statistics, and plain TensorFlow loads it:

    import tensorflow as tf
    model = tf.saved_model.load(DIR)
    block3 = model.signatures["serving_default"](images=uint8_rgb)["block3"]

Signatures (also callable as `model.uint8_rgb(images)` / `model.float_rgb(images)`):

    serving_default, uint8_rgb: images uint8 [N, H, W, 3], RGB 0-255
    float_rgb:                  images float32 [N, H, W, 3], RGB in [0, 255]
    output `block3`: float32 [N, ceil(H/s), ceil(W/s), C], s = output stride (32 unless
        exported with --output_stride), C = 1024 for the 101 trunk, 128 for tiny.

`DIR/assets.extra/mtss_export.json` records the checkpoint, trunk and stride.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import json
import os
import shutil

import numpy as np
from absl import app, flags

from mtss_train import loader
from mtss_train.model import trunk
from mtss_train.compat import tf
from mtss_train.errors import MtssError, cli_main
from mtss_train.log_levels import quieted

OUTPUT_KEY = "block3"
INFO_FILE = os.path.join("assets.extra", "mtss_export.json")
# SavedModel vs the in-process extractor, relative to the largest |feature|: the same ops
# run, but graph rewrites (e.g. fused BatchNorm) may round differently.
TOLERANCE = 1e-5


class Block3Export(tf.Module):
    """The trunk's variables and the two block3 functions; the Keras layer itself stays out
    of the saved object graph (it is only captured by the traced functions)."""

    def __init__(self, extractor: loader.FeatureExtractor):
        super().__init__(name="mtss_block3")
        self.trunk_variables = list(extractor.layer.variables)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def uint8_rgb(images: tf.Tensor) -> dict[str, tf.Tensor]:
            return {OUTPUT_KEY: extractor(images)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def float_rgb(images: tf.Tensor) -> dict[str, tf.Tensor]:
            return {OUTPUT_KEY: extractor(images)}

        self.uint8_rgb, self.float_rgb = uint8_rgb, float_rgb


def export_saved_model(checkpoint: str, out_dir: str, size: str | None = None,
                       output_stride: int | None = None) -> dict:
    """Writes the SavedModel to `out_dir` (atomically: complete or absent) and checks it.

    Returns:
      The export info (also in DIR/assets.extra/mtss_export.json), with `max_deviation`:
      the largest |SavedModel - extractor| on a test batch, relative to the largest |feature|.

    Raises:
      CheckpointError: missing or unfit checkpoint. MtssError: `out_dir` is not empty or
      cannot be written, or the reloaded model deviates by more than TOLERANCE.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise MtssError(f"export directory {out_dir} exists and is not empty; pass a new --out")
    model = loader.Trunk(checkpoint, loader.TrunkSettings(trunk_size=size, output_stride=output_stride))
    if model.prefix is None:
        raise MtssError("export needs a checkpoint; `random` weights are not a model to ship")
    extractor = model.extractor
    module = Block3Export(extractor)
    info = {"checkpoint": model.prefix, "trunk_size": model.size, "output_stride": output_stride or 32,
            "preprocessing": f"RGB minus {list(trunk.VGG_MEAN_RGB)}", "output": OUTPUT_KEY,
            "signatures": {"serving_default": "uint8", "uint8_rgb": "uint8", "float_rgb": "float32 in [0, 255]"},
            "tensorflow": tf.__version__}
    # data.files.write_atomically's scheme, for a directory (so not that helper: it removes a file).
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    try:
        with quieted("absl", "WARNING"):  # Saving logs an INFO line per signature about its variables.
            tf.saved_model.save(module, tmp, signatures={"serving_default": module.uint8_rgb,
                                                         "uint8_rgb": module.uint8_rgb, "float_rgb": module.float_rgb})
        info["max_deviation"] = _check(tmp, extractor)
        os.makedirs(os.path.join(tmp, os.path.dirname(INFO_FILE)), exist_ok=True)
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # Empty (checked above); os.replace cannot replace a directory.
        os.replace(tmp, out_dir)
    except OSError as e:
        raise MtssError(f"cannot write the SavedModel to {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _check(path: str, extractor: loader.FeatureExtractor) -> float:
    """Reloads the SavedModel and compares both signatures with the extractor."""
    images = np.random.default_rng(0).integers(0, 256, [2, 80, 96, 3], dtype=np.uint8)
    expected = extractor(images).numpy()
    loaded = tf.saved_model.load(path)
    scale = max(float(np.abs(expected).max()), 1e-12)
    deviation = 0.0
    for name, batch in (("uint8_rgb", images), ("float_rgb", images.astype(np.float32))):
        actual = loaded.signatures[name](images=tf.constant(batch))[OUTPUT_KEY].numpy()
        if actual.shape != expected.shape:
            raise MtssError(f"exported {name} gives shape {actual.shape}, the extractor {expected.shape}")
        deviation = max(deviation, float(np.abs(actual - expected).max()) / scale)
    if deviation > TOLERANCE:
        raise MtssError(f"the reloaded SavedModel deviates from the extractor by {deviation:.2e} (> {TOLERANCE})")
    return deviation


def define_flags() -> None:
    """The command's flags, defined when it runs: tests import this module beside other
    commands whose flags share names."""
    flags.DEFINE_string("checkpoint", None, "Checkpoint prefix, file or train dir.", required=True)
    flags.DEFINE_string("out", None, "New directory for the SavedModel.", required=True)
    flags.DEFINE_enum("trunk_size", None, list(trunk.TRUNK_SIZES), "Trunk (default: what the checkpoint holds).")
    flags.DEFINE_enum("output_stride", None, ["8", "16", "32"], "Atrous block3 stride (default 32).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {' '.join(argv[1:])}")
    options = flags.FLAGS
    stride = int(options.output_stride) if options.output_stride else None
    info = export_saved_model(options.checkpoint, options.out, options.trunk_size, stride)
    print(f"SavedModel: {options.out} ({info['trunk_size']} trunk, stride {info['output_stride']}; "
          f"reloaded output matches the extractor within {info['max_deviation']:.1e} of the largest feature)")
    print(f"signatures: serving_default / uint8_rgb (images uint8 [N,H,W,3]), float_rgb (images float32 "
          f"[N,H,W,3] in [0,255]) -> {OUTPUT_KEY}")


def run() -> None:
    define_flags()
    app.run(cli_main(main))


if __name__ == "__main__":
    run()
