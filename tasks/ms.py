"""Motion segmentation (Pathak, Girshick, Dollár, Darrell & Hariharan, "Learning Features by
Watching Objects Move", CVPR 2017).

An offline extractor (`python -m mtss_train.data.motion_masks`) turns videos into frames and
binary masks of what moves; the network sees ONE still frame and predicts, per pixel, the
probability that it belongs to a moving object, so it has to learn what objects look like.

Each example is a random square crop (side a random fraction of the frame's shorter side,
resized to `crop` px) and a random horizontal flip, applied identically to frame and mask.
The head reads block3 at `output_stride` 16 by default (atrous block3, same variables as
stride 32), so a 224 px crop gives a 14x14 map of logits; the loss is sigmoid cross-entropy
there, against the mask area-averaged to that grid (soft targets at object edges), with
foreground pixels optionally weighted up (`foreground_weight`) since most pixels are
background. Metrics, on that grid with both masks thresholded at one half: per-example IoU
of the foreground (an empty prediction of an empty mask scores 1), IoU pooled over the batch
(0 for an all-background predictor, however sparse the masks) and pixel accuracy. ms sees
RGB frames (input_colour "rgb"): the paper harmonizes only relative position's input.

    python -m mtss_train --tasks ms --task_param ms.data=DIR --task_param ms.foreground_weight=2
"""

import dataclasses

from mtss_train import seeds
from mtss_train.compat import slim, tf
from mtss_train.data.masks import MaskSource, mask_source
from mtss_train.errors import MtssError
from mtss_train.task import MIN_IMAGE_SIDE, Batch, Metric, Task, TaskConfig, register_task

# Every output stride the trunk offers divides this, so the mask grid aligns with block3.
CROP_MULTIPLE = 32
SUMMARY_EXAMPLES = 4


@register_task
class MotionSegmentation(Task):
    name = "ms"
    source_kind = "motion_masks"
    input_colour = "rgb"

    @dataclasses.dataclass
    class Config(TaskConfig):
        crop: int = 224  # Side of the square input, a multiple of CROP_MULTIPLE.
        min_scale: float = 0.5  # The crop covers a random fraction in [min_scale, max_scale]
        max_scale: float = 1.0  # of the frame's shorter side.
        flip: bool = True
        foreground_weight: float = 1.0  # Loss weight of a foreground pixel; background has 1.
        head_width: int = 256
        output_stride: int | None = 16  # Atrous block3: 14x14 logits at a 224 px crop.

        def validate(self) -> None:
            super().validate()
            if self.crop < CROP_MULTIPLE or self.crop % CROP_MULTIPLE:
                raise MtssError(f"ms.crop must be a positive multiple of {CROP_MULTIPLE}, got {self.crop}")
            if not 0 < self.min_scale <= self.max_scale <= 1:
                raise MtssError(
                    f"ms needs 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}"
                )
            if not self.foreground_weight > 0:
                raise MtssError(f"ms.foreground_weight must be > 0, got {self.foreground_weight}")
            if self.head_width < 1:
                raise MtssError(f"ms.head_width must be >= 1, got {self.head_width}")

    def open_source(self, path: str | None) -> MaskSource:
        return mask_source(path, MIN_IMAGE_SIDE)

    def make_dataset(self, source: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        examples = seeds.map_with_seeds(
            source, lambda pair, example_seed: self.make_example(pair["frame"], pair["mask"], example_seed), seed
        )
        return examples.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def make_example(self, frame: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor) -> Batch:
        """One example from a frame and its mask, all randomness drawn from `seed` ([2] int).

        Args:
          frame: uint8 [H, W, 3] RGB.
          mask: uint8 [H, W, 1], 0 background, 255 foreground.

        Returns:
          'frame': [C, C, 3] float32 in [0, 255]; 'mask': [C, C, 1] float32 in [0, 1]
          (C = crop; fractional at resampled edges).
        """
        c = self.config
        scale_seed, place_seed, flip_seed = seeds.split(seed, 3)
        both = tf.concat([tf.cast(frame, tf.float32), tf.cast(mask, tf.float32)], axis=-1)  # One geometry.
        scale = tf.random.stateless_uniform([], scale_seed, c.min_scale, c.max_scale)
        short_side = tf.cast(tf.reduce_min(tf.shape(both)[:2]), tf.float32)
        side = tf.maximum(tf.cast(tf.round(scale * short_side), tf.int32), 1)
        window = tf.image.stateless_random_crop(both, tf.stack([side, side, 4]), place_seed)
        window = tf.image.resize(window, [c.crop, c.crop], antialias=True)
        if c.flip:
            window = tf.image.stateless_random_flip_left_right(window, flip_seed)
        window = tf.ensure_shape(window, [c.crop, c.crop, 4])
        return {
            "frame": tf.clip_by_value(window[..., :3], 0.0, 255.0),
            "mask": tf.clip_by_value(window[..., 3:] / 255.0, 0.0, 1.0),
        }

    def trunk_images(self, batch: Batch) -> tf.Tensor:
        return batch["frame"]

    def head(self, block3: tf.Tensor, end_points: dict, batch: Batch, is_training: bool) -> dict[str, tf.Tensor]:
        # Pre-activation block3 is a raw residual sum: normalise it first, as slim's postnorm.
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        net = slim.conv2d(net, self.config.head_width, [3, 3], scope="conv1")  # Sees its neighbours.
        logits = slim.conv2d(net, 1, [1, 1], activation_fn=None, normalizer_fn=None, scope="logits")
        return {"logits": logits}

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, Metric]]:
        logits = tf.cast(outputs["logits"], tf.float32)
        target = downsample_mask(batch["mask"], tf.shape(logits)[1:3])
        per_example = weighted_sigmoid_loss(logits, target, self.config.foreground_weight)
        return per_example, mask_metrics(logits, target)

    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        frame = batch["frame"][:SUMMARY_EXAMPLES] / 255.0
        size = tf.shape(frame)[1:3]
        probability = tf.sigmoid(tf.cast(outputs["logits"][:SUMMARY_EXAMPLES], tf.float32))
        predicted = tf.image.resize(probability, size, method="nearest")  # Shows the real grid.
        target = batch["mask"][:SUMMARY_EXAMPLES]
        grey = lambda mask: tf.tile(mask, [1, 1, 1, 3])  # noqa: E731
        return {"frame_predicted_target": tf.concat([frame, grey(predicted), grey(target)], axis=2)}


def downsample_mask(mask: tf.Tensor, size: tf.Tensor | list[int]) -> tf.Tensor:
    """[N, H, W, 1] masks in [0, 1] -> [N, h, w, 1]: the foreground fraction of each cell."""
    return tf.image.resize(tf.cast(mask, tf.float32), size, method="area")


def weighted_sigmoid_loss(logits: tf.Tensor, target: tf.Tensor, foreground_weight: float) -> tf.Tensor:
    """Per-example sigmoid cross-entropy, weighted mean over pixels.

    Args:
      logits: [N, h, w, 1] float32.
      target: [N, h, w, 1] foreground fraction in [0, 1] (soft at edges).
      foreground_weight: weight of a foreground pixel (background 1; a soft pixel in between).

    Returns:
      [N] float32: sum(weight * xent) / sum(weight) per example, so the loss keeps its scale
      whatever the weighting.
    """
    weight = 1.0 + (foreground_weight - 1.0) * target
    xent = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
    return tf.reduce_sum(weight * xent, [1, 2, 3]) / tf.reduce_sum(weight, [1, 2, 3])


def mask_metrics(logits: tf.Tensor, target: tf.Tensor) -> dict[str, Metric]:
    """IoU and pixel accuracy of masks thresholded at one half.

    Args:
      logits: [N, h, w, 1]; a pixel is predicted foreground when its probability >= 0.5.
      target: [N, h, w, 1] foreground fraction; a pixel is foreground when >= 0.5.

    Returns:
      'iou': [N] per example |pred & target| / |pred | target|, 1 when both are empty
        (nothing to find, nothing claimed).
      'pooled_iou': (per-example IoU [N], union [N]) — as a weighted metric it is
        sum |pred & target| / sum |pred | target| over the whole batch. Frames with little
        or no foreground dominate the per-example mean (an all-background predictor scores
        the fraction of empty targets); the pooled IoU of that predictor is 0.
      'pixel_accuracy': [N] fraction of pixels labelled right.
    """
    predicted = tf.cast(logits, tf.float32) >= 0.0
    truth = target >= 0.5
    count = lambda m: tf.reduce_sum(tf.cast(m, tf.float32), [1, 2, 3])  # noqa: E731
    intersection = count(predicted & truth)
    union = count(predicted | truth)
    iou = tf.where(union > 0, intersection / tf.maximum(union, 1.0), 1.0)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(predicted, truth), tf.float32), [1, 2, 3])
    return {"iou": iou, "pooled_iou": (iou, union), "pixel_accuracy": accuracy}
