"""Rotation prediction as an mtss-train task (Gidaris, Singh & Komodakis, ICLR 2018).

The network sees a square crop of a photo turned by 0, 90, 180 or 270 degrees and says
which. To do that it has to know which way is up for the objects in the photo, and that
is the representation we want from the trunk. As in the paper, every crop is shown in
all four orientations in the same batch, so the trunk cannot cheat on the crop's content.

This file is the whole task: nothing in mtss_train changes. Train it beside relative
position with

    python -m mtss_train --tasks rp,rotnet:RotNet --smoke      # with examples/rotation on PYTHONPATH

docs/adding-a-task.md walks through it piece by piece.
"""

# --8<-- [start:imports]
import dataclasses

from mtss_train import seeds
from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError
from mtss_train.task import Batch, Metric, Task, TaskConfig, register_task

TURNS = 4  # 0, 90, 180 and 270 degrees: the four classes.
# --8<-- [end:imports]


# --8<-- [start:class]
@register_task  # Lets `--tasks rotnet` work once this module is imported (optional).
class RotNet(Task):
    """Predicts by how many quarter turns each of four copies of a crop was rotated."""

    name = "rotnet"  # Checkpoint scope rotnet_head/, TensorBoard tags train/rotnet/...
    smoke_settings = {"batch_size": "4", "crop_size": "64"}  # What --smoke sets, under the user's.
# --8<-- [end:class]

    # --8<-- [start:config]
    @dataclasses.dataclass
    class Config(TaskConfig):
        """Each field is a `--task_param rotnet.<field>=<value>` setting."""

        crop_size: int = 128  # Side of the square crop, in pixels, before it is turned.
        min_crop_fraction: float = 0.6  # The crop's side is this to 1.0 of the image's shorter side.
        head_width: int = 256  # Channels of the head's hidden 1x1 convolution.

        def validate(self) -> None:
            super().validate()  # batch_size, loss_weight, output_stride.
            # MtssError: the command ends with this one line, not a traceback.
            if not 0.0 < self.min_crop_fraction <= 1.0:
                raise MtssError(f"rotnet.min_crop_fraction must be in (0, 1], got {self.min_crop_fraction}")
    # --8<-- [end:config]

    # --8<-- [start:pipeline]
    def make_dataset(self, source: tf.data.Dataset, batch_size: int, seed: int | tf.Tensor) -> tf.data.Dataset:
        # `seed` may be a tensor (parameter servers): seeds.map_with_seeds gives every
        # example its own stateless seed from (seed, index), so it never becomes a Python int.
        examples = seeds.map_with_seeds(source, self.make_example, seed)
        return examples.batch(batch_size, drop_remainder=True)

    def make_example(self, image: tf.Tensor, seed: tf.Tensor) -> Batch:
        """One decoded photo (uint8 [H, W, 3]) -> its crop in the four orientations."""
        size_seed, crop_seed = seeds.split(seed, 2)
        short_side = tf.cast(tf.reduce_min(tf.shape(image)[:2]), tf.float32)
        fraction = tf.random.stateless_uniform([], size_seed, self.config.min_crop_fraction, 1.0)
        side = tf.cast(fraction * short_side, tf.int32)
        crop = tf.image.stateless_random_crop(image, [side, side, 3], crop_seed)
        crop = tf.image.resize(tf.cast(crop, tf.float32), [self.config.crop_size] * 2, antialias=True)
        turned = tf.stack([tf.image.rot90(crop, k) for k in range(TURNS)])  # [4, S, S, 3]
        return {"turned": turned, "label": tf.range(TURNS, dtype=tf.int32)}
    # --8<-- [end:pipeline]

    # --8<-- [start:trunk_images]
    def trunk_images(self, batch: Batch) -> tf.Tensor:
        # [N, 4, S, S, 3] -> [4N, S, S, 3]: the trunk sees every orientation as an image.
        turned = batch["turned"]
        return tf.reshape(turned, tf.concat([[-1], tf.shape(turned)[2:]], 0))
    # --8<-- [end:trunk_images]

    # --8<-- [start:head]
    def head(self, block3: tf.Tensor, end_points: dict[str, tf.Tensor], batch: Batch,
             is_training: bool) -> dict[str, tf.Tensor]:
        # slim layers take weight decay and BatchNorm settings from the arg_scope the trainer
        # opens around the head; variables land under rotnet_head/.
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        net = tf.reduce_mean(net, [1, 2], keepdims=True)  # Global average pool: [4N, 1, 1, C].
        net = slim.conv2d(net, self.config.head_width, [1, 1], scope="hidden")
        logits = slim.conv2d(net, TURNS, [1, 1], activation_fn=None, normalizer_fn=None, scope="logits")
        return {"logits": tf.reshape(logits, [-1, TURNS, TURNS])}  # [N, orientation, class]
    # --8<-- [end:head]

    # --8<-- [start:loss]
    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, Metric]]:
        logits = tf.cast(outputs["logits"], tf.float32)  # float32 even under --precision bfloat16.
        labels = batch["label"]  # [N, 4]: 0, 1, 2, 3 for every example.
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)  # [N, 4]
        guessed = tf.argmax(logits, -1, output_type=tf.int32)
        correct = tf.cast(tf.equal(guessed, labels), tf.float32)
        metrics = {
            "accuracy": tf.reduce_mean(correct, -1),  # Per example: its four orientations.
            "all_four_right": tf.reduce_min(correct, -1),  # 1 when every turn of the crop is right.
        }
        return tf.reduce_mean(cross_entropy, -1), metrics  # Per-example loss [N].
    # --8<-- [end:loss]

    # --8<-- [start:pictures]
    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # The four orientations of the first three crops side by side, one row per crop.
        turned = batch["turned"][:3]  # [K, 4, S, S, 3]
        rows = tf.concat(tf.unstack(turned, axis=1), axis=2)  # [K, S, 4S, 3]
        return {"orientations": tf.clip_by_value(rows / 255.0, 0.0, 1.0)}
    # --8<-- [end:pictures]
