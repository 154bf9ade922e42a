"""The exemplar task's views: strongly augmented copies of one seed patch of an image.

Following Dosovitskiy et al. [1] (NIPS 2014, "Discriminative unsupervised feature learning
with convolutional neural networks", section 2), a seed patch is taken from the image and
each view applies, with parameters drawn independently per view:

  geometry (one affine warp, so the image is resampled once):
    * translation by up to 0.2 of the patch size, vertically and horizontally;
    * scaling of the patch by a factor in [0.7, 1.4];
    * rotation by up to 20 degrees;
    * (not in [1]) a horizontal flip with probability 1/2: mirrored photos stay natural
      photos, so it only adds variety;
  colour:
    * "contrast 1": the projection of each pixel onto the principal components of the
      colour of all pixels is multiplied by a factor in [0.5, 2] per component. We use the
      RGB principal axes of ImageNet pixels (those of AlexNet-style "PCA lighting" noise,
      values as in fb.resnet.torch) and scale deviations from the view's mean colour, so
      the average colour stays put;
    * "contrast 2": saturation and value (HSV) are raised to a power in [0.25, 4],
      multiplied by a factor in [0.7, 1.4] and shifted by [-0.1, 0.1], S and V separately;
    * "color": hue (on the unit circle of hues) is shifted by [-0.1, 0.1].

[1] does not say how its factors are distributed; ratios symmetric around 1 ([0.5, 2],
[0.25, 4]) are drawn log-uniformly here, everything else uniformly. All ops are TF ops and
all randomness is stateless, drawn from the seed passed in, so a view is a pure function of
(image, seed).
"""

import dataclasses
import math

import numpy as np

from mtss_train import seeds
from mtss_train.compat import tf

# Principal axes (columns) of ImageNet RGB pixels, as used by AlexNet-style "PCA lighting"
# augmentation (values as in fb.resnet.torch); the first is (roughly) brightness.
IMAGENET_RGB_EIGENVECTORS = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], np.float32
)
# The published axes are rounded to 4 digits: scaling with the exact inverse keeps a factor
# of 1 an exact identity.
_EIGENVECTORS_INVERSE = np.linalg.inv(IMAGENET_RGB_EIGENVECTORS).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Ranges of the view augmentations (see the module docstring for their meaning).

    Attributes:
      size: side of each view in pixels.
      seed_fraction: (low, high) side of the seed patch as a fraction of the image's
        shorter side.
      scale: (low, high) zoom of a view relative to the seed patch (>1 magnifies).
      translation: largest shift of a view's centre, as a fraction of the patch side.
      rotation_degrees: largest rotation either way.
      flip: whether half of the views are mirrored left-right.
      pca_factor: per-principal-component contrast factor in [1/pca_factor, pca_factor].
      sv_power: S and V are raised to a power in [1/sv_power, sv_power].
      sv_factor: (low, high) factor on S and V.
      sv_shift: largest shift added to S and V (they live in [0, 1]).
      hue_shift: largest hue shift (hues live on [0, 1)).
    """

    size: int
    seed_fraction: tuple[float, float]
    scale: tuple[float, float]
    translation: float
    rotation_degrees: float
    flip: bool
    pca_factor: float
    sv_power: float
    sv_factor: tuple[float, float]
    sv_shift: float
    hue_shift: float

    @property
    def reach(self) -> float:
        """How far from the seed centre a view can sample, in seed-patch sides."""
        angle = math.radians(min(self.rotation_degrees, 45.0))
        # Half the rotated, zoomed-out view's bounding box, plus the largest shift.
        return 0.5 / self.scale[0] * (math.cos(angle) + math.sin(angle)) + self.translation

    def views(self, image: tf.Tensor, seed: tf.Tensor, count: int) -> tf.Tensor:
        """`count` augmented views of one random seed patch of `image`.

        Args:
          image: [H, W, 3] RGB, uint8 or float in [0, 255].
          seed: [2] int stateless seed.
          count: number of views.

        Returns:
          [count, size, size, 3] float32 RGB in [0, 255].
        """
        patch_seed, warp_seed, colour_seed = seeds.split(seed, 3)
        context, centre = self.seed_context(tf.cast(image, tf.float32), patch_seed)
        warped = self.warp(context, centre, warp_seed, count)
        return self.jitter_colour(warped / 255.0, colour_seed) * 255.0

    def seed_context(self, image: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """A random seed patch with the context the views may reach, resized so the patch
        side is `size` pixels.

        Args:
          image: [H, W, 3] float32.
          seed: [2] int stateless seed.

        Returns:
          (context [h, w, 3] float32, centre [2] float32 (y, x) of the seed patch in it,
          in pixel-index coordinates).
        """
        fraction_seed, centre_seed = seeds.split(seed, 2)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        low, high = self.seed_fraction
        side = tf.random.stateless_uniform([], fraction_seed, low, high) * tf.reduce_min(shape)
        # Pixel i covers [i - 0.5, i + 0.5]; the patch lies inside the image.
        centre = side / 2 - 0.5 + tf.random.stateless_uniform([2], centre_seed) * (shape - side)
        reach = self.reach * side
        start = tf.maximum(tf.floor(centre - reach), 0.0)
        stop = tf.minimum(tf.math.ceil(centre + reach) + 1, shape)
        crop = tf.slice(image, tf.concat([tf.cast(start, tf.int32), [0]], 0),
                        tf.concat([tf.cast(stop - start, tf.int32), [3]], 0))
        zoom = self.size / side
        resized = tf.maximum(tf.round((stop - start) * zoom), 1.0)
        context = tf.image.resize(crop, tf.cast(resized, tf.int32), antialias=True)
        zoom = resized / (stop - start)  # Per axis, after rounding.
        # tf.image.resize maps pixel centres: new = (old - start + 0.5) * zoom - 0.5.
        return context, (centre - start + 0.5) * zoom - 0.5

    def warp(self, context: tf.Tensor, centre: tf.Tensor, seed: tf.Tensor, count: int) -> tf.Tensor:
        """`count` views around `centre` of `context`, each shifted, zoomed, rotated and
        maybe mirrored at random.

        Args:
          context: [h, w, 3] float32 (a seed patch is `size` pixels wide in it).
          centre: [2] float32 (y, x) of the seed patch centre in `context`.
          seed: [2] int stateless seed.
          count: number of views.

        Returns:
          [count, size, size, 3] float32; pixels beyond `context` mirror it.
        """
        shift_seed, scale_seed, angle_seed, flip_seed = seeds.split(seed, 4)
        shift = tf.random.stateless_uniform([count, 2], shift_seed, -self.translation, self.translation) * self.size
        scale = tf.random.stateless_uniform([count], scale_seed, self.scale[0], self.scale[1])
        angle = tf.random.stateless_uniform([count], angle_seed, -1.0, 1.0) * math.radians(self.rotation_degrees)
        mirror = tf.random.stateless_uniform([count], flip_seed) < 0.5 if self.flip else tf.zeros([count], tf.bool)
        sign = tf.where(mirror, -1.0, 1.0)
        # Output pixel p (x, y) samples the context at centre + shift + R(angle) F (p - c) / scale,
        # F = diag(sign, 1) mirrors x, c is the view's centre pixel.
        cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
        a0, a1, b0, b1 = cos * sign, -sin, sin * sign, cos
        c = (self.size - 1) / 2.0
        a2 = centre[1] + shift[:, 1] - (a0 + a1) * c
        b2 = centre[0] + shift[:, 0] - (b0 + b1) * c
        zeros = tf.zeros([count])
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.repeat(context[None], count, axis=0), transforms=transforms,
            output_shape=[self.size, self.size], fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT",
        )

    def jitter_colour(self, views: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Principal-component contrast, then HSV saturation / value / hue jitter.

        Args:
          views: [V, S, S, 3] float32 RGB in [0, 1].
          seed: [2] int stateless seed.

        Returns:
          [V, S, S, 3] float32 RGB in [0, 1].
        """
        count = views.shape[0]
        pca_seed, power_seed, factor_seed, shift_seed, hue_seed = seeds.split(seed, 5)
        log_pca = math.log(self.pca_factor)
        factors = tf.exp(tf.random.stateless_uniform([count, 3], pca_seed, -log_pca, log_pca))
        # M = E diag(f) E^-1 scales each principal component of the colour by its factor.
        mixing = tf.einsum("dk,vk,kc->vdc", IMAGENET_RGB_EIGENVECTORS, factors, _EIGENVECTORS_INVERSE)
        mean = tf.reduce_mean(views, axis=[1, 2], keepdims=True)
        views = tf.clip_by_value(mean + tf.einsum("vhwc,vdc->vhwd", views - mean, mixing), 0.0, 1.0)

        hsv = tf.image.rgb_to_hsv(views)
        log_power = math.log(self.sv_power)
        power = tf.exp(tf.random.stateless_uniform([count, 1, 1, 2], power_seed, -log_power, log_power))
        factor = tf.random.stateless_uniform([count, 1, 1, 2], factor_seed, self.sv_factor[0], self.sv_factor[1])
        shift = tf.random.stateless_uniform([count, 1, 1, 2], shift_seed, -self.sv_shift, self.sv_shift)
        sat_value = tf.clip_by_value(tf.pow(hsv[..., 1:], power) * factor + shift, 0.0, 1.0)
        hue_shift = tf.random.stateless_uniform([count, 1, 1, 1], hue_seed, -self.hue_shift, self.hue_shift)
        hue = tf.math.floormod(hsv[..., :1] + hue_shift, 1.0)
        return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, sat_value], -1)), 0.0, 1.0)
