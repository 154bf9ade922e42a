"""Colour classes of colorization (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV
2016): the in-gamut ab bins, soft-encoded targets, class rebalancing, annealed-mean decoding.

The ab plane is quantized on a 10-unit grid. Zhang et al. keep "the Q = 313 values which are
in-gamut" without stating the rule; here the bins are derived from the sRGB gamut in code
(`ab_bins`): a grid point is a bin iff some sRGB colour has its ab within GAMUT_RADIUS of it.
The smallest such rules fall short of 313 (grid points whose own 10x10 cell holds an sRGB
colour: 261; those on a corner of a grid square holding one: 309), so the paper's rule
reaches further out than sRGB proper; every radius in about [13.3, 13.7] gives exactly 313,
and we use the middle, 13.5. (Beyond that distance the soft encoding below would give a bin
under exp(-13.5**2 / (2 * 5**2)) ~ 3% of the nearest bin's weight.)

Checked against Zhang's released bins, richzhang/colorization resources/pts_in_hull.npy (313 x
2 int64, a-major; that repository is too large to fetch here, so its values were read from
two independent copies that agree exactly: the .npy in molnarkg7/colorizing_blackwhite_images
and a literal list in another project): 309 of the 313 bins are the same. Zhang's set also
has (-30, -50), (40, 90), (100, -90), (100, 0) (13.7 to 14.8 from the sRGB gamut) and lacks
(-60, 100), (80, -120), (80, 80), (110, -60) (11.8 to 12.8 from it), so no distance rule
gives it; Zhang's is probably the grid points of an empirical (ImageNet) hull. The 8 differ
at the gamut's rim, where photos put almost no mass; we keep the rule, which needs no data
file. `tests/test_col.py` pins the difference.

Targets are soft: each ab spreads over its 5 nearest bins with Gaussian weights (sigma 5),
as the paper says. (Zhang's released training layer, resources/caffe_traininglayers.py
NNEncLayer, uses sigma 5 with 10 neighbours: there the 6th to 10th take about 4% of the
weight, at most 7%, of ab values inside the bins' cells.) `soft_encode` reads them from a
lookup table over the ab plane cut into 1-unit squares (built once, ~2.6 MB), each encoded at
its centre, instead of measuring distances to all 313 bins per pixel. The centres sit on half
units, so none is equidistant from two bins (their midpoints lie on whole units): the table
never has to break a tie.

Class rebalancing weighs each target by its nearest bin's w ~ 1 / ((1 - lambda) p~ + lambda /
Q), lambda = 0.5, normalised so that its expectation is 1: the paper's Eq. 4, and Zhang's
PriorBoostLayer (resources/caffe_traininglayers.py: gamma = .5, alpha = 1, the weight of the
argmax bin of the soft target). Two details differ there: Zhang's uniform part spreads over
the bins his prior has seen, and his normalisation uses the prior file as it is; here the
uniform covers all 313 bins and p~ is the prior smoothed by the Gaussian of sigma 5, as the
paper defines it.
"""

import functools

import numpy as np

from mtss_train.model import colorspace
from mtss_train.compat import tf

GRID_STEP = 10.0
GAMUT_RADIUS = 13.5
NUM_BINS = 313
NEIGHBOURS = 5
SIGMA = 5.0
REBALANCE_LAMBDA = 0.5
TEMPERATURE = 0.38
# The lookup table covers |a|, |b| <= TABLE_RANGE (sRGB reaches about 108) in TABLE_STEP squares.
TABLE_RANGE = 128
TABLE_STEP = 1.0
_TABLE_SIDE = int(2 * TABLE_RANGE / TABLE_STEP)


@functools.lru_cache(maxsize=1)
def srgb_surface_ab() -> np.ndarray:
    """ab [K, 2] of every 8-bit colour on the surface of the RGB cube (float64).

    The ab outline of the whole gamut is traced by the cube's faces: inside the cube a
    colour's ab can be kept while moving along one direction until a face is reached.
    """
    values = np.arange(256, dtype=np.uint8)
    u, v = (x.ravel() for x in np.meshgrid(values, values))
    faces = []
    for axis in range(3):
        for level in (0, 255):
            face = np.empty([u.size, 3], np.uint8)
            face[:, axis] = level
            face[:, [c for c in range(3) if c != axis]] = np.stack([u, v], axis=1)
            faces.append(face)
    with tf.init_scope():  # Constants: computed eagerly even when first asked inside a trace.
        lab = colorspace.rgb_to_lab(tf.constant(np.concatenate(faces))).numpy()
    return lab[:, 1:].astype(np.float64)


def grid_distance_to_gamut(grid_step: float = GRID_STEP, resolution: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
    """(grid points [G, 2] over [-TABLE_RANGE, TABLE_RANGE]^2, their distance [G] to the
    nearest sRGB ab), distances exact to about `resolution` (raster + distance transform)."""
    import cv2  # Only needed to build constants.

    side = int(round(2 * TABLE_RANGE / resolution)) + 1
    raster = np.full([side, side], 255, np.uint8)  # 0 marks rasterized sRGB ab.
    cells = np.round((srgb_surface_ab() + TABLE_RANGE) / resolution).astype(int)
    raster[cells[:, 0], cells[:, 1]] = 0
    distance = cv2.distanceTransform(raster, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * resolution
    steps = np.arange(-np.floor(TABLE_RANGE / grid_step), np.floor(TABLE_RANGE / grid_step) + 1) * grid_step
    grid = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)
    index = np.round((grid + TABLE_RANGE) / resolution).astype(int)
    return grid, distance[index[:, 0], index[:, 1]]


@functools.lru_cache(maxsize=4)
def ab_bins(radius: float = GAMUT_RADIUS, grid_step: float = GRID_STEP) -> np.ndarray:
    """The in-gamut bin centres [Q, 2] float32 (a-major order): grid points within
    `radius` of some sRGB colour's ab. Q = 313 for the defaults."""
    grid, distance = grid_distance_to_gamut(grid_step)
    return grid[distance <= radius].astype(np.float32)


@functools.lru_cache(maxsize=1)
def encoding_table() -> tuple[np.ndarray, np.ndarray]:
    """The soft encoding of the centre of every square of the ab lookup table.

    Returns:
      (bins [T*T, 5] int32 nearest first, weights [T*T, 5] float32 summing to 1), row
      i * T + j for the square centred on ab = (table_centre(i), table_centre(j)).
    """
    steps = table_centre(np.arange(_TABLE_SIDE))
    points = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)
    parts = [_nearest_bins(points[i:i + 8192]) for i in range(0, len(points), 8192)]  # Bounded memory.
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _nearest_bins(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the NEIGHBOURS nearest bins [P, 5] int32 by distance, Gaussian weights [P, 5] summing
    to 1) of ab points [P, 2]: the exact soft encoding."""
    squared = ((points[:, None, :] - ab_bins().astype(np.float64)[None]) ** 2).sum(-1)  # [P, Q]
    nearest = np.argpartition(squared, NEIGHBOURS, axis=1)[:, :NEIGHBOURS]
    nearest = np.take_along_axis(nearest, np.argsort(np.take_along_axis(squared, nearest, 1), axis=1), 1)
    weights = np.exp(-np.take_along_axis(squared, nearest, 1) / (2 * SIGMA**2))
    return nearest.astype(np.int32), (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def table_centre(index: np.ndarray) -> np.ndarray:
    """The a (or b) at the centre of the table's squares number `index` along that axis."""
    return -TABLE_RANGE + (index + 0.5) * TABLE_STEP


def soft_encode(ab: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Soft targets of ab values, by table lookup: the encoding of the centre of the
    TABLE_STEP square holding each ab (at most 0.71 units away).

    Args:
      ab: [..., 2] float.

    Returns:
      (bins [..., 5] int32, nearest bin first; weights [..., 5] float32 summing to 1).
    """
    bins, weights = encoding_table()
    cell = tf.cast(tf.floor((tf.cast(ab, tf.float32) + TABLE_RANGE) / TABLE_STEP), tf.int32)
    cell = tf.clip_by_value(cell, 0, _TABLE_SIDE - 1)
    row = cell[..., 0] * _TABLE_SIDE + cell[..., 1]
    return tf.gather(tf.constant(bins), row), tf.gather(tf.constant(weights), row)


def nearest_bin(ab: tf.Tensor) -> tf.Tensor:
    """The hard class [...] int32 of ab [..., 2]: its nearest bin (by the table)."""
    return soft_encode(ab)[0][..., 0]


def bin_histogram(ab: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Counts [Q] float32 of the nearest bins of ab [..., 2] where mask [...] (0/1) is set."""
    return tf.math.bincount(
        tf.reshape(nearest_bin(ab), [-1]), weights=tf.reshape(tf.cast(mask, tf.float32), [-1]),
        minlength=NUM_BINS, maxlength=NUM_BINS, dtype=tf.float32,
    )


def smoothed(prior: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """The prior [Q] blurred over the ab plane by a Gaussian of `sigma` (mass kept: each
    bin's mass spreads over the bins with weights that sum to 1)."""
    centres = ab_bins().astype(np.float64)
    kernel = np.exp(-((centres[:, None] - centres[None]) ** 2).sum(-1) / (2 * sigma**2))  # [to, from]
    return (kernel / kernel.sum(0, keepdims=True)) @ (np.asarray(prior, np.float64) / np.sum(prior))


def rebalancing_weights(prior: np.ndarray, lam: float = REBALANCE_LAMBDA, sigma: float = SIGMA) -> np.ndarray:
    """Class weights [Q] float32: w ~ 1 / ((1 - lam) * p~ + lam / Q), with p~ the prior
    smoothed by `sigma`, scaled so that the p~-weighted mean of w is 1."""
    p = smoothed(prior, sigma)
    weights = 1.0 / ((1.0 - lam) * p + lam / p.size)
    return (weights / (p @ weights)).astype(np.float32)


def annealed_mean(logits: tf.Tensor, temperature: float = TEMPERATURE) -> tf.Tensor:
    """The annealed-mean ab [..., 2] of logits [..., Q]: the mean of the distribution
    re-sharpened as p^(1/T), i.e. softmax(logits / T)."""
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)
    return tf.tensordot(probabilities, tf.constant(ab_bins()), axes=1)
