"""sRGB <-> CIE Lab in TensorFlow ops, for tf.data pipelines and the model alike.

sRGB (IEC 61966-2-1) in [0, 255] -> linear RGB -> XYZ (D65) -> L*a*b*, and back. Any
leading dimensions; works eagerly, in tf.data and inside tf.function.

The reference white is the XYZ of sRGB white (1, 1, 1), i.e. the row sums of the matrix
below (D65 to 5 decimals), so every neutral RGB colour (r = g = b) has a = b = 0 exactly
and `grey_rgb` (the L channel shown as grey) needs no Lab round trip.

    lab = rgb_to_lab(image)                          # [..., 3]: L in [0, 100], a, b
    grey = grey_rgb(image)                           # L only, as three equal channels
    back = lab_to_rgb(lab)                           # [..., 3] float32 in [0, 255]
"""

import numpy as np

from mtss_train.compat import tf

# Linear sRGB -> XYZ, from the Rec. 709 primaries and the D65 white point.
XYZ_FROM_LINEAR_RGB = np.array([
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
])
WHITE_XYZ = XYZ_FROM_LINEAR_RGB.sum(axis=1)
# XYZ already divided by the white point: each row sums to 1, so rgb (1, 1, 1) -> (1, 1, 1).
_XYZN_FROM_LINEAR = XYZ_FROM_LINEAR_RGB / WHITE_XYZ[:, None]
_LINEAR_FROM_XYZN = np.linalg.inv(_XYZN_FROM_LINEAR)
_LUMINANCE = _XYZN_FROM_LINEAR[1]  # Y of linear RGB (row 2; white has Y = 1).

# CIE Lab's f(t): a cube root above DELTA**3, a line below it (continuous with its slope).
DELTA = 6.0 / 29.0


def _power(x: tf.Tensor, exponent: float) -> tf.Tensor:
    """x ** exponent for x > 0 as exp(exponent * log x): several times faster than tf.pow on
    CPU (vectorized exp and log), the same to float32 precision."""
    return tf.exp(exponent * tf.math.log(x))


def _decode_linear(c: tf.Tensor) -> tf.Tensor:
    """sRGB transfer function inverse: encoded [0, 1] -> linear [0, 1]."""
    return tf.where(c <= 0.04045, c / 12.92, _power((tf.maximum(c, 0.04045) + 0.055) / 1.055, 2.4))


def _encode_linear(c: tf.Tensor) -> tf.Tensor:
    """sRGB transfer function: linear [0, 1] -> encoded [0, 1] (input clipped to [0, 1])."""
    c = tf.clip_by_value(c, 0.0, 1.0)
    return tf.where(c <= 0.0031308, c * 12.92, 1.055 * _power(tf.maximum(c, 0.0031308), 1 / 2.4) - 0.055)


# An 8-bit channel has 256 values: look its linear value up instead of computing pow per pixel.
_BYTES = np.arange(256) / 255.0
_LINEAR_OF_BYTE = np.where(_BYTES <= 0.04045, _BYTES / 12.92, ((_BYTES + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_rgb(rgb: tf.Tensor) -> tf.Tensor:
    """sRGB [..., 3] (uint8, or float in [0, 255]) -> linear RGB float32 [..., 3] in [0, 1]."""
    rgb = tf.convert_to_tensor(rgb)
    if rgb.dtype == tf.uint8:
        return tf.gather(tf.constant(_LINEAR_OF_BYTE), tf.cast(rgb, tf.int32))
    return _decode_linear(tf.cast(rgb, tf.float32) / 255.0)


def _f(t: tf.Tensor) -> tf.Tensor:
    return tf.where(t > DELTA**3, _power(tf.maximum(t, DELTA**3), 1 / 3), t / (3 * DELTA**2) + 4 / 29)


def _f_inverse(t: tf.Tensor) -> tf.Tensor:
    return tf.where(t > DELTA, t**3, 3 * DELTA**2 * (t - 4 / 29))


def _matmul(x: tf.Tensor, matrix: np.ndarray) -> tf.Tensor:
    """The 3x3 matrix applied to every colour of x [..., 3] (einsum: tf.linalg.matvec
    broadcasts the matrix over the pixels and is ten times slower)."""
    return tf.einsum("...c,dc->...d", x, tf.constant(matrix, tf.float32))


def rgb_to_lab(rgb: tf.Tensor) -> tf.Tensor:
    """sRGB -> CIE Lab (D65).

    Args:
      rgb: [..., 3] uint8, or float in [0, 255].

    Returns:
      [..., 3] float32 (L in [0, 100]; a, b roughly in [-87, 99] x [-108, 95] for sRGB).
    """
    fx, fy, fz = tf.unstack(_f(_matmul(linear_rgb(rgb), _XYZN_FROM_LINEAR)), axis=-1)
    return tf.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: tf.Tensor) -> tf.Tensor:
    """CIE Lab (D65) -> sRGB; colours outside the sRGB gamut are clipped per channel.

    Args:
      lab: [..., 3] float (L, a, b).

    Returns:
      [..., 3] float32 RGB in [0, 255].
    """
    lightness, a, b = tf.unstack(tf.cast(lab, tf.float32), axis=-1)
    fy = (lightness + 16) / 116
    xyz = _f_inverse(tf.stack([fy + a / 500, fy, fy - b / 200], axis=-1))
    return 255.0 * _encode_linear(_matmul(xyz, _LINEAR_FROM_XYZN))


def grey_rgb(rgb: tf.Tensor) -> tf.Tensor:
    """The lightness L alone, as a grey RGB image: `lab_to_rgb(L, 0, 0)`.

    With a = b = 0 the colour is the neutral grey of the same luminance Y, whose linear RGB
    is (Y, Y, Y); so this is Y re-encoded, with no cube roots.

    Args:
      rgb: [..., 3] uint8, or float in [0, 255].

    Returns:
      [..., 3] float32 in [0, 255], three equal channels.
    """
    luminance = tf.reduce_sum(linear_rgb(rgb) * tf.constant(_LUMINANCE, tf.float32), axis=-1, keepdims=True)
    grey = 255.0 * _encode_linear(luminance)
    return tf.concat([grey, grey, grey], axis=-1)
