"""Test tasks that use the Task API's hooks, loaded by import path like any plugin.

- PairedMasks reads its own source (a directory of NAME_frame.png + NAME_mask.png pairs)
  and predicts the mask densely with block3 at stride 16.
- UnitMix's head reads a learned mix of block3's unit outputs instead of block3.
- LossNamedMetric returns a metric named 'loss', which the trainer must refuse.
"""

import dataclasses
import glob
import os

import numpy as np

from mtss_train.model import trunk
from mtss_train.compat import slim, tf
from mtss_train.data.images import decode_rgb, read_file
from mtss_train.data.source import SkipCounter
from mtss_train.errors import DataError
from mtss_train.task import Batch, Task, TaskConfig
from plugin_rotation import Rotation

SIZE = 64


class PairedMaskSource:
    """Endless shuffled {'frame', 'mask'} pairs from NAME_frame.png / NAME_mask.png files."""

    def __init__(self, path: str):
        self.path = path
        frames = sorted(glob.glob(os.path.join(path, "*_frame.png")))
        self.pairs = [(f, f.replace("_frame.png", "_mask.png")) for f in frames]
        if not self.pairs:
            raise DataError(f"no *_frame.png under {path}")
        self.skipped = SkipCounter()

    def _decode(self, frame_path: bytes, mask_path: bytes) -> tuple[np.ndarray, np.ndarray]:
        frame = decode_rgb(read_file(frame_path), SIZE)
        mask = decode_rgb(read_file(mask_path), SIZE)
        if frame is None or mask is None:
            self.skipped.add(frame_path.decode())
            return np.zeros([0, SIZE, 3], np.uint8), np.zeros([0, SIZE, 1], np.uint8)
        return frame[:SIZE, :SIZE], mask[:SIZE, :SIZE, :1]

    def dataset(self, seed: int, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        frames, masks = zip(*self.pairs)
        pairs = tf.data.Dataset.from_tensor_slices((list(frames), list(masks))).shard(*shard)
        decoded = pairs.shuffle(len(frames), seed=seed).repeat().map(
            lambda f, m: tf.numpy_function(self._decode, [f, m], (tf.uint8, tf.uint8), stateful=False))
        decoded = decoded.filter(lambda frame, mask: tf.shape(frame)[0] > 0)
        return decoded.map(lambda frame, mask: {"frame": tf.ensure_shape(frame, [SIZE, SIZE, 3]),
                                                "mask": tf.ensure_shape(mask, [SIZE, SIZE, 1])})


class PairedMasks(Task):
    """Dense foreground prediction from frame/mask pairs, at block3 stride 16."""

    name = "paired"
    source_kind = "paired_pngs"

    @dataclasses.dataclass
    class Config(TaskConfig):
        output_stride: int | None = 16

    def open_source(self, path: str | None) -> PairedMaskSource:
        if path is None:
            raise DataError("paired needs --task_param paired.data=DIR")
        return PairedMaskSource(path)

    def make_dataset(self, source: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        return source.batch(batch_size, drop_remainder=True)

    def trunk_images(self, batch: Batch) -> tf.Tensor:
        return tf.cast(batch["frame"], tf.float32)

    def head(self, block3: tf.Tensor, end_points: dict, batch: Batch, is_training: bool) -> dict[str, tf.Tensor]:
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        return {"logits": slim.conv2d(net, 1, [1, 1], activation_fn=None, normalizer_fn=None, scope="logits")}

    def target(self, batch: Batch, logits: tf.Tensor) -> tf.Tensor:
        mask = tf.cast(batch["mask"] > 127, tf.float32)
        return tf.image.resize(mask, tf.shape(logits)[1:3], method="area")

    def loss(self, outputs: dict, batch: Batch) -> tuple[tf.Tensor, dict]:
        logits = tf.cast(outputs["logits"], tf.float32)
        target = self.target(batch, logits)
        per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(target, logits)
        correct = tf.cast(tf.equal(logits > 0, target > 0.5), tf.float32)
        return tf.reduce_mean(per_pixel, [1, 2, 3]), {"pixel_accuracy": tf.reduce_mean(correct, [1, 2, 3])}

    def image_summaries(self, batch: Batch, outputs: dict) -> dict[str, tf.Tensor]:
        mask = tf.image.grayscale_to_rgb(tf.cast(batch["mask"][:4], tf.float32))
        return {"frame_mask": tf.concat([tf.cast(batch["frame"][:4], tf.float32), mask], axis=2) / 255.0}


class UnitMix(Rotation):
    """Rotation whose head reads a learned weighted sum of block3's unit outputs."""

    name = "unit_mix"

    def head(self, block3: tf.Tensor, end_points: dict, batch: Batch, is_training: bool) -> dict[str, tf.Tensor]:
        prefix = f"{trunk.REPRESENTATION}/unit_"
        units = sorted((k for k in end_points if k.startswith(prefix) and k.endswith("/bottleneck_v2")),
                       key=lambda k: int(k[len(prefix):].split("/")[0]))
        # Units before block3's last one run at twice its resolution: pool them down to it.
        pooled = []
        for key in units:
            factor = end_points[key].shape[1] // block3.shape[1]
            pooled.append(tf.nn.avg_pool2d(end_points[key], factor, factor, "SAME"))
        stacked = tf.stack(pooled, axis=-1)
        weights = tf.compat.v1.get_variable("unit_weights", [len(units)], initializer=tf.ones_initializer())
        mixed = tf.reduce_sum(stacked * tf.cast(weights, stacked.dtype), axis=-1) / len(units)
        return super().head(mixed, end_points, batch, is_training)


class LossNamedMetric(Rotation):
    name = "loss_named"

    def loss(self, outputs: dict, batch: Batch) -> tuple[tf.Tensor, dict]:
        per_example, metrics = super().loss(outputs, batch)
        return per_example, {**metrics, "loss": per_example}
