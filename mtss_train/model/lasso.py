"""The lasso of the multi-task paper (Doersch & Zisserman 2017, Fig. 1b): each head reads a
learned linear combination of the outputs of block3's units instead of block3 alone, with a
sparsity penalty on the weights, so each task picks the depths it needs.

Why not the paper's plain L1 on alpha: every head normalises its input (BatchNorm, after a
linear layer at the latest), so in training the task loss cannot tell alpha from c * alpha.
An L1 then only shrinks alpha's scale, which costs the loss nothing, and the optimizer's
orthogonal updates grow it back; which depths win is left to the task loss alone. Here the
scale is fixed by construction and the penalty acts on the direction only:

    n_u   = ReLU(BN_u(unit_u))                 each unit normalised on its own, as slim's
                                               postnorm does after block4, but without a
                                               learned scale, which would absorb alpha_u
                                               (deepcontext's heads leave BN's scale out
                                               for a like reason: cdoersch/deepcontext,
                                               train.py, its BatchNorm comment)
    mix   = sum_u alpha_u * n_u / ||alpha||_1  what the head reads
    cost  = lasso_l1 * ||alpha||_1 / ||alpha||_2

The penalty is the L1 norm of alpha measured against its L2 norm (Hoyer, "Non-negative
Matrix Factorization with Sparseness Constraints", JMLR 2004; used on BatchNorm networks for
this very reason by Yang, Wen & Li, "DeepHoyer", ICLR 2020): it goes from sqrt(units) when
every depth weighs the same to 1 when one depth carries all, whatever alpha's scale, so
`lasso_l1` trades the task loss against the number of depths a head uses. alpha starts
uniform (the mean over depths), a stationary point of the penalty that the task loss leaves
at once. Normalising each unit first makes the weights comparable: block3's residual sum
grows with depth, so raw units would need smaller weights the deeper they are.

Every lasso variable lives in the head's scope (`<task>_head/lasso/alpha`,
`<task>_head/lasso/unit_<u>/{beta,moving_mean,moving_variance}`), so trunk checkpoints and
the exported block3 representation are the same with or without the lasso.
"""

import math

from mtss_train.model import trunk
from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError

ALPHA = "lasso/alpha"


def sparsity_penalty(alpha: tf.Tensor) -> tf.Tensor:
    """||alpha||_1 / ||alpha||_2: 1 when one entry carries all, sqrt(len) when all are equal."""
    return tf.reduce_sum(tf.abs(alpha)) / tf.maximum(tf.norm(alpha), 1e-12)


def unit_shares(alpha: tf.Tensor) -> tf.Tensor:
    """|alpha_u| / ||alpha||_1: the share of the mix each unit carries (sums to 1)."""
    magnitude = tf.abs(tf.cast(alpha, tf.float32))
    return magnitude / tf.maximum(tf.reduce_sum(magnitude), 1e-12)


def top_quarter_share(alpha: tf.Tensor) -> tf.Tensor:
    """The share of |alpha| on the task's strongest quarter of units (at least one unit):
    0.25 for a uniform mix, 1 when a quarter of the depths carry everything."""
    shares = unit_shares(alpha)
    top = max(1, math.ceil(shares.shape[0] / 4))
    return tf.reduce_sum(tf.math.top_k(shares, top).values)


def mix_units(block3: tf.Tensor, end_points: dict[str, tf.Tensor], penalty_weight: float) -> tf.Tensor:
    """sum_u alpha_u * ReLU(BN_u(unit_u)) / ||alpha||_1, each unit at block3's resolution.

    Call inside the head's variable scope and arg_scope (BatchNorm's decay, epsilon and
    `is_training` come from there).

    Args:
      block3: [N, h, w, C] block3 output.
      end_points: the trunk's end points, with every block3 unit's output.
      penalty_weight: weight of `sparsity_penalty(alpha)`, a regularization loss of the head.

    Returns:
      [N, h, w, C] in block3's dtype.
    """
    units = [end_points[name] for name in trunk.block3_units(end_points)]
    with tf.compat.v1.variable_scope("lasso"):
        alpha = tf.compat.v1.get_variable(
            "alpha", [len(units)], tf.float32, tf.constant_initializer(1.0 / len(units)),
            regularizer=lambda a: penalty_weight * sparsity_penalty(a),
        )
        normalised = [
            slim.batch_norm(_at_resolution(unit, block3.shape[1]), scale=False, activation_fn=tf.nn.relu,
                            scope=f"unit_{i}")
            for i, unit in enumerate(units, start=1)
        ]
    weights = alpha / tf.maximum(tf.reduce_sum(tf.abs(alpha)), 1e-12)
    return tf.tensordot(tf.stack(normalised, axis=-1), tf.cast(weights, block3.dtype), axes=1)


def _at_resolution(unit: tf.Tensor, height: int | None) -> tf.Tensor:
    """At stride 32, units before block3's last (stride-2) unit have twice its resolution:
    subsample them as slim's shortcut does (every other pixel).

    Raises:
      MtssError: if the resolutions are not static, as with a task (e.g. a plug-in) whose
        batches have no fixed image size.
    """
    if unit.shape[1] is None or height is None:
        head = tf.compat.v1.get_variable_scope().name.split("/")[0]  # Called inside the head's scope.
        raise MtssError(f"--lasso needs images of a fixed size, but {head} gets block3 units of shape {unit.shape}; "
                        "give that task's batches a static height and width")
    step = math.ceil(unit.shape[1] / height)
    return unit[:, ::step, ::step, :] if step > 1 else unit


def alpha_picture(alphas: list[tf.Tensor], pixels_per_cell: int = 16) -> tf.Tensor:
    """The task x unit matrix of unit shares (`unit_shares`) as one [1, tasks*p, units*p, 3]
    picture in [0, 1], a row per task (in the order given), scaled by the largest share:
    white = the strongest depth of any task, black = a depth its task does not read."""
    matrix = tf.stack([unit_shares(a) for a in alphas])
    matrix /= tf.maximum(tf.reduce_max(matrix), 1e-12)
    cells = tf.repeat(tf.repeat(matrix, pixels_per_cell, axis=0), pixels_per_cell, axis=1)
    return tf.tile(cells[tf.newaxis, :, :, tf.newaxis], [1, 1, 1, 3])


def summaries(alphas: dict[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], dict[str, dict[str, tf.Tensor]],
                                                     dict[str, tf.Tensor]]:
    """TensorBoard's view of the tasks' alphas ({task: alpha}, picture rows in that order):
    scalars {`lasso/<task>/top_quarter_share`}, pictures {`lasso`: {`alpha_task_by_unit`}}
    and histograms {`lasso/<task>`: alpha}."""
    scalars = {f"lasso/{name}/top_quarter_share": top_quarter_share(alpha) for name, alpha in alphas.items()}
    pictures = {"lasso": {"alpha_task_by_unit": alpha_picture(list(alphas.values()))}}
    return scalars, pictures, {f"lasso/{name}": alpha for name, alpha in alphas.items()}
