"""A task from outside the framework: rotation prediction (Gidaris et al., ICLR 2018).

It lives in this test file and is loaded by import path (`--tasks plugin_rotation:Rotation`)
to show that a new task needs one module and no edit of mtss_train.
"""

import dataclasses

from mtss_train.compat import slim, tf
from mtss_train.task import Batch, Task, TaskConfig


class Rotation(Task):
    """Predict which of 0/90/180/270 degrees a random square crop was rotated by."""

    name = "rotation"

    @dataclasses.dataclass
    class Config(TaskConfig):
        crop_size: int = 64

    def make_dataset(self, images: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        size = self.config.crop_size

        def example(image: tf.Tensor, index: tf.Tensor) -> Batch:
            crop_seed, turn_seed = tf.unstack(tf.random.experimental.stateless_split([seed, index], 2))
            side = tf.reduce_min(tf.shape(image)[:2])
            square = tf.image.stateless_random_crop(image, [side, side, 3], crop_seed)
            small = tf.image.resize(tf.cast(square, tf.float32), [size, size], antialias=True)
            turns = tf.random.stateless_uniform([], turn_seed, 0, 4, tf.int32)
            return {"image": tf.image.rot90(small, turns), "label": turns}

        numbered = tf.data.Dataset.zip(images, tf.data.Dataset.counter())
        return numbered.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)

    def trunk_images(self, batch: Batch) -> tf.Tensor:
        return batch["image"]

    def head(self, block3: tf.Tensor, end_points: dict[str, tf.Tensor], batch: Batch,
             is_training: bool) -> dict[str, tf.Tensor]:
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        net = tf.reduce_mean(net, [1, 2], keepdims=True)
        logits = slim.conv2d(net, 4, [1, 1], activation_fn=None, normalizer_fn=None, scope="logits")
        return {"logits": tf.squeeze(logits, [1, 2])}

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        logits = outputs["logits"]
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["label"])
        return per_example, {"accuracy": tf.cast(correct, tf.float32)}

    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"rotated": batch["image"][:4] / 255.0}


class DivergingRotation(Rotation):
    """Rotation whose loss turns non-finite, to exercise the trainer's NaN guard."""

    name = "diverging"

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        per_example, metrics = super().loss(outputs, batch)
        return per_example * float("nan"), metrics
