"""The lasso of the multi-task paper (Doersch & Zisserman 2017, Fig. 1b): each head reads a
learned linear combination of the outputs of block3's units instead of block3 alone.

One alpha per unit per task, L1-regularised so each task keeps few depths. The weights live
in the head's scope (`<task>_head/lasso/alpha`), so trunk checkpoints and the exported
block3 representation are the same with or without the lasso.
"""

import math

from mtss_train import trunk
from mtss_train.compat import tf

ALPHA = "lasso/alpha"


def mix_units(block3: tf.Tensor, end_points: dict[str, tf.Tensor], l1_weight: float) -> tf.Tensor:
    """Σ_u alpha_u · unit_u, each unit's output at block3's resolution.

    Call inside the head's variable scope. alpha starts uniform (1 / units), so training
    starts from the mean over depths and the L1 then drives the unused depths toward 0.

    Args:
      block3: [N, h, w, C] block3 output.
      end_points: the trunk's end points, with every block3 unit's output.
      l1_weight: weight of the L1 penalty on alpha (a regularization loss of the head).

    Returns:
      [N, h, w, C] in block3's dtype.
    """
    units = [end_points[name] for name in trunk.block3_units(end_points)]
    with tf.compat.v1.variable_scope("lasso"):
        alpha = tf.compat.v1.get_variable(
            "alpha", [len(units)], tf.float32, tf.constant_initializer(1.0 / len(units)),
            regularizer=lambda a: l1_weight * tf.reduce_sum(tf.abs(a)),
        )
    stacked = tf.stack([_at_resolution(u, block3.shape[1]) for u in units], axis=-1)
    return tf.tensordot(stacked, tf.cast(alpha, stacked.dtype), axes=1)


def _at_resolution(unit: tf.Tensor, height: int | None) -> tf.Tensor:
    """At stride 32, units before block3's last (stride-2) unit have twice its resolution:
    subsample them as slim's shortcut does (every other pixel)."""
    if unit.shape[1] is None or height is None:
        raise ValueError("the lasso needs static spatial shapes; give the task's batches a fixed size")
    step = math.ceil(unit.shape[1] / height)
    return unit[:, ::step, ::step, :] if step > 1 else unit


def alpha_picture(alphas: list[tf.Tensor], pixels_per_cell: int = 8) -> tf.Tensor:
    """The task x unit matrix of |alpha| as one [1, tasks*p, units*p, 3] picture in [0, 1],
    a row per task (in the order given), scaled by the largest |alpha|: white = strongest."""
    matrix = tf.abs(tf.stack([tf.cast(a, tf.float32) for a in alphas]))
    matrix /= tf.maximum(tf.reduce_max(matrix), 1e-12)
    cells = tf.repeat(tf.repeat(matrix, pixels_per_cell, axis=0), pixels_per_cell, axis=1)
    return tf.tile(cells[tf.newaxis, :, :, tf.newaxis], [1, 1, 1, 3])
