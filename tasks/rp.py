"""Relative position (Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning
by Context Prediction", ICCV 2015).

From each image, a 3x3 grid of patches (96 px, 48 px gaps, each jittered by up to 7 px) is
placed at random; the network sees the centre patch and one of its 8 neighbours, each
through the shared trunk, and predicts which neighbour it was. Against trivial shortcuts:
colour dropping (keep one channel, replace the others with faint noise) or projection
toward grey along a = [-1, 2, -1] (chromatic aberration), and random downsampling of
about a third of the patches (down to ~100 pixels) and back up.

    python -m mtss_train --tasks rp --task_param rp.color=project

The head follows deepcontext's shape (cdoersch/deepcontext, train.py): a per-patch layer, the
two patches side by side, two wide layers, an 8-way classifier. There fc6 is 4096 wide per
patch (fully connected over CaffeNet's conv5), fc7 and fc8 4096 over the concatenated pair,
then fc9 with 8 outputs. Here the per-patch layer is a 1x1 conv to head_width / 2 channels
at block3's grid and fc6/fc7 are head_width (512) wide, about 3M parameters for 96 px
patches. At 4096 the head would hold about 170M (fc6 alone reads 2 x 3 x 3 x 2048 values),
six times the trunk through block3 (27.5M), and dominate every rp step;
`--task_param rp.head_width=4096` gives deepcontext's widths for fc6/fc7 all the same.
"""

import dataclasses
import math

from mtss_train import seeds
from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError
from mtss_train.task import Batch, Task, TaskConfig, register_task

# Label k means the neighbour sits at NEIGHBOUR_OFFSETS[k] = (row, col) grid steps from
# the centre patch, in row-major order with the centre left out.
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Chromatic-aberration axis (green vs magenta) that "project" removes, from [1].
ABERRATION_AXIS = (-1.0, 2.0, -1.0)
COLOR_MODES = ("drop", "project", "none")


@register_task
class RelativePosition(Task):
    name = "rp"
    harmonize_to_grey = True  # As in the multi-task paper (section 3.3).
    # Under --harmonize the trunk sees the patch's lightness L, as col sees its crops: the L
    # of a colour patch. Colour dropping and projection hide colour cues, which grey input
    # no longer has, and dropping would leave L as one channel's luminance share (a fifth
    # of the contrast, measured on the sample photos).
    harmonized_settings = {"color": "none"}

    @dataclasses.dataclass
    class Config(TaskConfig):
        patch_size: int = 96
        gap: int = 48
        jitter: int = 7
        min_pixels: int = 150_000  # Images are resized to a random total pixel count
        max_pixels: int = 450_000  # in [min_pixels, max_pixels], keeping aspect ratio.
        color: str = "drop"  # One of COLOR_MODES.
        downsample_prob: float = 1 / 3
        downsample_min_pixels: int = 100
        head_width: int = 512

        def validate(self) -> None:
            super().validate()
            if self.color not in COLOR_MODES:
                raise MtssError(f"rp.color must be one of {COLOR_MODES}, got {self.color!r}")
            if not (0 < self.patch_size and 0 <= self.jitter and 0 <= self.gap):
                raise MtssError("rp.patch_size must be > 0, rp.gap and rp.jitter >= 0")
            if not 0 < self.min_pixels <= self.max_pixels:
                raise MtssError("rp needs 0 < min_pixels <= max_pixels")
            if not 0 <= self.downsample_prob <= 1:
                raise MtssError(f"rp.downsample_prob must be in [0, 1], got {self.downsample_prob}")

    @property
    def grid_span(self) -> int:
        """Pixels the 3x3 grid covers along each side, jitter included."""
        c = self.config
        return 3 * c.patch_size + 2 * c.gap + 2 * c.jitter

    def make_dataset(self, images: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        pairs = seeds.map_with_seeds(images, self.make_pair, seed)
        return pairs.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def make_pair(self, image: tf.Tensor, seed: tf.Tensor) -> Batch:
        """One example from an RGB image, all randomness drawn from `seed` ([2] int).

        Returns:
          'patches': [2, P, P, 3] float32 in [0, 255], centre first; 'label': int32 in
          0..7; 'corners': [2, 2] int32 top-left (y, x) of both patches in the resized image.
        """
        c = self.config
        draws = iter(seeds.split(seed, 7))
        image = self._resize(tf.cast(image, tf.float32), next(draws))
        label = tf.random.stateless_uniform([], next(draws), 0, 8, tf.int32)
        grid_step = c.patch_size + c.gap
        room = tf.cast(tf.shape(image)[:2] - self.grid_span + 1, tf.float32)
        # Top-left of the centre cell, placed so all 8 neighbours (and their jitter) fit.
        centre = c.jitter + grid_step + tf.cast(
            tf.random.stateless_uniform([2], next(draws)) * room, tf.int32
        )
        offsets = tf.constant(NEIGHBOUR_OFFSETS, tf.int32)
        corners = tf.stack([centre, centre + offsets[label] * grid_step])
        corners += tf.random.stateless_uniform([2, 2], next(draws), -c.jitter, c.jitter + 1, tf.int32)
        patches = [
            self._augment(
                tf.slice(image, [corners[i, 0], corners[i, 1], 0], [c.patch_size, c.patch_size, 3]),
                next(draws),
            )
            for i in range(2)
        ]
        return {"patches": tf.stack(patches), "label": label, "corners": corners}

    def _resize(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        c = self.config
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        pixels = tf.random.stateless_uniform([], seed, float(c.min_pixels), float(c.max_pixels))
        scale = tf.sqrt(pixels / (shape[0] * shape[1]))
        scale = tf.maximum(scale, self.grid_span / tf.reduce_min(shape))  # The grid must fit.
        size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        return tf.image.resize(image, size, antialias=True)

    def _augment(self, patch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        c = self.config
        channel_seed, noise_seed, side_seed, coin_seed = seeds.split(seed, 4)
        if c.color == "drop":
            keep = tf.one_hot(tf.random.stateless_uniform([], channel_seed, 0, 3, tf.int32), 3)
            kept = tf.reduce_sum(patch * keep, axis=-1, keepdims=True)
            # Dropped channels get noise ~1/100 of the kept channel's std, around its mean.
            noise = tf.random.stateless_normal(tf.shape(patch), noise_seed)
            noise *= tf.math.reduce_std(kept) / 100.0
            patch = patch * keep + (tf.reduce_mean(kept) + noise) * (1.0 - keep)
        elif c.color == "project":
            axis = tf.constant(ABERRATION_AXIS) / math.sqrt(6.0)
            patch -= tf.reduce_sum((patch - 127.5) * axis, -1, keepdims=True) * axis
        if c.downsample_prob > 0:
            low = math.sqrt(c.downsample_min_pixels)
            side = tf.cast(tf.random.stateless_uniform([], side_seed, low, c.patch_size), tf.int32)
            small = tf.image.resize(
                tf.image.resize(patch, [side, side], antialias=True), [c.patch_size, c.patch_size]
            )
            coin = tf.random.stateless_uniform([], coin_seed)
            patch = tf.cond(coin < c.downsample_prob, lambda: small, lambda: patch)
        return tf.clip_by_value(patch, 0.0, 255.0)

    def trunk_images(self, batch: Batch) -> tf.Tensor:
        p = self.config.patch_size
        return tf.reshape(batch["patches"], [-1, p, p, 3])  # Pairs fold into the batch.

    def head(self, block3: tf.Tensor, end_points: dict[str, tf.Tensor], batch: Batch,
             is_training: bool) -> dict[str, tf.Tensor]:
        width = self.config.head_width
        # Pre-activation block3 is a raw residual sum: normalise it first, as slim's postnorm.
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        net = slim.conv2d(net, width // 2, [1, 1], scope="reduce")
        _, h, w, d = net.shape
        pair = tf.reshape(net, [-1, 1, 1, 2 * h * w * d])  # Centre and neighbour side by side.
        net = slim.conv2d(pair, width, [1, 1], scope="fc6")
        net = slim.conv2d(net, width, [1, 1], scope="fc7")
        logits = slim.conv2d(net, 8, [1, 1], activation_fn=None, normalizer_fn=None, scope="fc8")
        return {"logits": tf.squeeze(logits, [1, 2])}

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        logits = tf.cast(outputs["logits"], tf.float32)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["label"]), tf.float32)
        return per_example, {"accuracy": correct}

    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        pairs = tf.concat([batch["patches"][:4, 0], batch["patches"][:4, 1]], axis=2)
        return {"centre_neighbour": pairs / 255.0}
