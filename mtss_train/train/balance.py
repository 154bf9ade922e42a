"""Task balancing: how a step that trains several tasks at once (`--schedule all`) turns
their losses into one update of the shared trunk.

    none         the sum of the tasks' weighted losses (`loss_weight`)
    uncertainty  learned homoscedastic-uncertainty weights (Kendall, Gal & Cipolla, CVPR 2018)
    gradnorm     learned weights that equalise the tasks' gradient norms on the trunk's last
                 shared layer, scaled by how slowly each task trains (Chen et al., ICML 2018)
    pcgrad       each task's trunk gradient projected off the others' where they conflict
                 (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020)

Heads are never balanced: each head takes its own task's plain gradient. Every method runs
inside the replica function and decides from gradients summed over the replicas (one
all-reduce), identically on every replica, so two replicas of half a batch take the step of
one device on the whole batch (tests/test_distributed.py). Parameter-server workers step
apart, each with its own copy of the learned weights: config.validate refuses that pairing.

Learned weights and their optimizer's slots are checkpointed under `balance/` (see
`checkpoint_variables`), outside the trunk's scope, so the released recipe still restores
the trunk alone. For TensorBoard every method keeps each task's weight and, when the step
computes the tasks' trunk gradients (always for pcgrad, at summary steps for the others),
the cosine between every two tasks' gradients (`picture`).
"""

import math
from typing import Callable, Sequence

from mtss_train.compat import tf, tf_keras
from mtss_train.errors import MtssError
from mtss_train.model.slim_layer import slim_name

BALANCES = ("none", "uncertainty", "gradnorm", "pcgrad")
SCOPE = "balance/"
# The keys of a step's differentiation targets besides its tasks' names (which have no '/').
TOTAL = "/total"  # The balanced total loss.
REGULARIZATION = "/regularization"  # Weight decay and the lasso's penalty.

# gradient(target key, variables) -> the gradients of that target (unscaled, None where unconnected).
Gradient = Callable[[str, Sequence[tf.Variable]], list]


def summed(shares: dict[str, tf.Tensor], regularization: tf.Tensor) -> tf.Tensor:
    """The unbalanced loss: regularization plus every task's share, added in that order."""
    total = regularization
    for share in shares.values():
        total += share
    return total


def _replicas() -> int:
    return tf.distribute.get_replica_context().num_replicas_in_sync


def summed_over_replicas(tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Each tensor summed over the replicas (itself with one replica)."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, list(tensors))


def _diagnostic(name: str, value: tf.Tensor) -> tf.Variable:
    """A value the step writes for TensorBoard only, never checkpointed.

    Like every variable a balance writes, each replica writes its own copy with a value
    computed from sums over the replicas, so the copies agree without an aggregation (which
    would broadcast the first replica's value: another collective, see `Balance`)."""
    return tf.Variable(value, trainable=False, name=SCOPE + name)


class Balance:
    """No balancing (`none`): the update follows the sum of the tasks' weighted losses.

    A step sums over the replicas, in one all-reduce, the model's gradients, what the method
    needs (`_to_sum`) and, when it needs them or `diagnose` asks, every task's trunk
    gradient; `_update` decides from those sums, and the model optimizer applies them
    without its own all-reduce: one collective per step, as without a balance. The balance's
    own weights are stepped with the sums, and every replica writes its copy of a balance
    variable itself (`_diagnostic`), without another collective. Subclasses override
    `total`, `_to_sum` and `_update`. Create under the strategy's scope.

    Args:
      task_names: the tasks a step trains, in the order of their rows in the picture.
      seed: the run's seed (pcgrad's random task order).
    """

    name = "none"
    # Whether every step needs each task's trunk gradient, not only the summary steps.
    needs_task_gradients = False
    # Whether `_update` makes the trunk's gradient itself (the plain one is not computed).
    replaces_trunk_gradient = False

    def __init__(self, task_names: Sequence[str], seed: int = 0):
        self.task_names = list(task_names)
        self.seed = seed
        count = len(self.task_names)
        self.cosines = _diagnostic("gradient_cosine", tf.fill([count, count], math.nan))
        self.weights = _diagnostic("task_weights", tf.ones([count]))

    @property
    def checkpoint_variables(self) -> dict[str, tf.Variable]:
        """What a checkpoint holds of the balance, by checkpoint name (all under `balance/`)."""
        return {}

    def build(self) -> None:
        """Creates the optimizer slots of learned weights (call under the strategy's scope)."""

    def total(self, shares: dict[str, tf.Tensor], regularization: tf.Tensor) -> tf.Tensor:
        """This replica's loss to differentiate; `shares`: each task's weighted share of its
        global mean loss."""
        return summed(shares, regularization)

    def update(self, gradient: Gradient, shares: dict[str, tf.Tensor], variables: Sequence[tf.Variable],
               shared: Sequence[tf.Variable], step: tf.Tensor, diagnose: bool) -> list[tuple[tf.Tensor, tf.Variable]]:
        """(gradient, variable) pairs for the model optimizer, gradients already summed over
        the replicas (apply them without aggregating again); trains the balance's own
        weights. `shared`: the trunk's variables among `variables`; `step`: the global step;
        `diagnose`: record the cosines between the tasks' trunk gradients."""
        shared_ids = {id(v) for v in shared}
        plain = [v for v in variables if not (self.replaces_trunk_gradient and id(v) in shared_ids)]
        plain_gradients = gradient(TOTAL, plain)  # Before any weight changes.
        # Dense: a gathered variable's IndexedSlices hold as many rows as that replica's batch
        # gathered, and an all-reduce needs one shape on every replica.
        connected = [tf.convert_to_tensor(g) for g in plain_gradients if g is not None]
        own = self._to_sum(gradient, shares, shared)
        local = connected + own
        with_tasks = self.needs_task_gradients or diagnose
        if with_tasks:
            for name in self.task_names:
                local += [tf.zeros_like(v, tf.float32) if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
                          for g, v in zip(gradient(name, shared), shared)]
        reduced = iter(summed_over_replicas(local))
        pairs = [(None if g is None else next(reduced), v) for g, v in zip(plain_gradients, plain)]
        pairs += [(None, v) for v in variables if self.replaces_trunk_gradient and id(v) in shared_ids]
        sums = [next(reduced) for _ in own]
        task_gradients = [[next(reduced) for _ in shared] for _ in self.task_names] if with_tasks else []
        gram = self._record_cosines(task_gradients) if task_gradients else None
        return self._update(pairs, sums, shared, step, (task_gradients, gram) if task_gradients else None)

    def _to_sum(self, gradient: Gradient, shares: dict[str, tf.Tensor], shared: Sequence[tf.Variable]) -> list[tf.Tensor]:
        """What this method needs summed over the replicas."""
        return []

    def _update(self, pairs: list[tuple[tf.Tensor, tf.Variable]], sums: list[tf.Tensor],
                shared: Sequence[tf.Variable], step: tf.Tensor,
                task_gradients: tuple[list[list[tf.Tensor]], tf.Tensor] | None) -> list[tuple[tf.Tensor, tf.Variable]]:
        """Steps the method's own weights from `sums` (of `_to_sum`); returns the model's
        (gradient, variable) pairs, given the plain ones (None for the trunk's if
        `replaces_trunk_gradient`). `task_gradients`: each task's trunk gradient and their
        Gram matrix, if computed. Everything is summed over the replicas."""
        return pairs

    def _record_cosines(self, gradients: list[list[tf.Tensor]]) -> tf.Tensor:
        """The Gram matrix of dot products of the tasks' gradients; records their cosines."""
        count = len(gradients)
        dots = [[None] * count for _ in range(count)]
        for i in range(count):
            for j in range(i, count):
                dots[i][j] = dots[j][i] = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(gradients[i], gradients[j])])
        gram = tf.stack([tf.stack(row) for row in dots])
        norms = tf.sqrt(tf.linalg.diag_part(gram))
        self.cosines.assign(gram / tf.maximum(norms[:, tf.newaxis] * norms[tf.newaxis, :], 1e-30))
        return gram

    def summaries(self) -> tuple[dict[str, tf.Tensor], dict[str, dict[str, tf.Tensor]]]:
        """(scalars {`balance/<task>/weight`, `balance/cosine/<task>_<task>`}, pictures
        {`balance`: {`gradient_cosine`}}); the cosines only once a step has measured them."""
        names = self.task_names
        scalars = {f"balance/{name}/weight": self.weights[i] for i, name in enumerate(names)}
        cosines = self.cosines.read_value()
        if bool(tf.reduce_any(tf.math.is_nan(cosines))):
            return scalars, {}
        scalars.update({f"balance/cosine/{names[i]}_{names[j]}": cosines[i, j]
                        for i in range(len(names)) for j in range(i + 1, len(names))})
        return scalars, {"balance": {"gradient_cosine": picture(cosines)}}


def _step_weights(optimizer: tf_keras.optimizers.Optimizer, gradients: Sequence[tf.Tensor],
                  variables: Sequence[tf.Variable]) -> None:
    """One step of a balance's own optimizer on gradients already summed over replicas."""
    optimizer.apply_gradients(zip(gradients, variables), skip_gradients_aggregation=True)


class Uncertainty(Balance):
    """Kendall, Gal & Cipolla (CVPR 2018): each task's loss weighted by a learned precision,

        total = sum_i exp(-s_i) * L_i + s_i,      s_i = log sigma_i^2, learned,

    twice their regression form (1/(2 sigma^2) L + log sigma), so the weight exp(-s_i) tends
    to 1 / L_i: every task's loss counts at one scale. They learn s rather than sigma^2 for
    numerical stability, as here. The s_i have their own Adam at `learning_rate` (the GradNorm
    paper's 0.025 for its uncertainty baseline), outside the model optimizer, whose RMSProp
    epsilon of 1 would barely move them.
    """

    name = "uncertainty"

    def __init__(self, task_names: Sequence[str], seed: int = 0, learning_rate: float = 0.025):
        super().__init__(task_names, seed)
        self.log_variances = [tf.Variable(0.0, name=f"{SCOPE}{name}/log_variance") for name in task_names]
        self.optimizer = tf_keras.optimizers.Adam(learning_rate)

    @property
    def checkpoint_variables(self) -> dict[str, tf.Variable]:
        return {**{slim_name(v): v for v in self.log_variances}, **_optimizer_variables(self.optimizer)}

    def build(self) -> None:
        self.optimizer.build(self.log_variances)

    def total(self, shares: dict[str, tf.Tensor], regularization: tf.Tensor) -> tf.Tensor:
        # The s_i term once per step: summed over the replicas, which each add their share.
        return regularization + tf.add_n([tf.exp(-s) * shares[name] + s / _replicas()
                                          for name, s in zip(self.task_names, self.log_variances)])

    def _to_sum(self, gradient: Gradient, shares: dict[str, tf.Tensor], shared: Sequence[tf.Variable]) -> list[tf.Tensor]:
        return gradient(TOTAL, self.log_variances)

    def _update(self, pairs: list[tuple[tf.Tensor, tf.Variable]], sums: list[tf.Tensor],
                shared: Sequence[tf.Variable], step: tf.Tensor,
                task_gradients: tuple[list[list[tf.Tensor]], tf.Tensor] | None) -> list[tuple[tf.Tensor, tf.Variable]]:
        _step_weights(self.optimizer, sums, self.log_variances)
        self.weights.assign(tf.exp(-tf.stack(self.log_variances)))
        return pairs


class GradNorm(Balance):
    """Chen, Badrinarayanan, Lee & Rabinovich (ICML 2018): learned task weights w_i (sum T,
    the task count) in total = sum_i w_i L_i, trained so that each task's gradient norm on
    the trunk's last shared layer W, G_i = ||grad_W w_i L_i||, approaches

        target_i = mean_j(G_j) * r_i ** alpha,   r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)),

    a task that trains slowly (its loss still near its first value) getting more. As in the
    paper the target is a constant for the weights' update, whose loss is
    L_grad = sum_i |G_i - target_i|, and the weights are renormalised to sum T after each
    step. L_grad's gradient for w_i is sign(G_i - target_i) * ||grad_W L_i|| in closed form
    (no second backward pass); it is divided here by the mean of those norms, a constant for
    the update, so the weights' steps do not depend on the layer's gradient scale. Their own
    Adam at `learning_rate` (the paper: "Updating w_i(t) is performed at a learning rate of
    0.025", Adam) and alpha's default 1.5 ("The optimal value of alpha for NYUv2 lies near
    alpha = 1.5", section 5.4) are the paper's. L_i(0) are the losses of the first step,
    checkpointed. A weight is kept above `MIN_WEIGHT` of the mean, so no task is silenced.
    """

    name = "gradnorm"
    MIN_WEIGHT = 1e-3

    def __init__(self, task_names: Sequence[str], seed: int = 0, learning_rate: float = 0.025, alpha: float = 1.5):
        super().__init__(task_names, seed)
        self.alpha = alpha
        self.task_weights = [tf.Variable(1.0, name=f"{SCOPE}{name}/weight") for name in task_names]
        self.initial_losses = [tf.Variable(0.0, trainable=False, name=f"{SCOPE}{name}/initial_loss")
                               for name in task_names]
        self.optimizer = tf_keras.optimizers.Adam(learning_rate)

    @property
    def checkpoint_variables(self) -> dict[str, tf.Variable]:
        named = {slim_name(v): v for v in [*self.task_weights, *self.initial_losses]}
        return {**named, **_optimizer_variables(self.optimizer)}

    def build(self) -> None:
        self.optimizer.build(self.task_weights)

    def total(self, shares: dict[str, tf.Tensor], regularization: tf.Tensor) -> tf.Tensor:
        return regularization + tf.add_n([w * shares[name] for name, w in zip(self.task_names, self.task_weights)])

    def _to_sum(self, gradient: Gradient, shares: dict[str, tf.Tensor], shared: Sequence[tf.Variable]) -> list[tf.Tensor]:
        last_layer = last_shared_layer(shared)
        return ([tf.cast(gradient(name, [last_layer])[0], tf.float32) for name in self.task_names]
                + [tf.cast(shares[name], tf.float32) for name in self.task_names])

    def _update(self, pairs: list[tuple[tf.Tensor, tf.Variable]], sums: list[tf.Tensor],
                shared: Sequence[tf.Variable], step: tf.Tensor,
                task_gradients: tuple[list[list[tf.Tensor]], tf.Tensor] | None) -> list[tuple[tf.Tensor, tf.Variable]]:
        count = len(self.task_names)
        norms = tf.stack([tf.norm(g) for g in sums[:count]])
        losses = tf.stack(sums[count:])
        initial = tf.stack(self.initial_losses)
        initial = tf.where(initial > 0, initial, losses)  # The first step's losses.
        for variable, value in zip(self.initial_losses, tf.unstack(initial)):
            variable.assign(value)
        gradient_norms = tf.stack(self.task_weights) * norms
        ratios = losses / tf.maximum(initial, 1e-12)
        rates = ratios / tf.maximum(tf.reduce_mean(ratios), 1e-12)
        targets = tf.reduce_mean(gradient_norms) * rates ** self.alpha
        weight_gradients = tf.sign(gradient_norms - targets) * norms / tf.maximum(tf.reduce_mean(norms), 1e-12)
        _step_weights(self.optimizer, tf.unstack(weight_gradients), self.task_weights)
        updated = tf.stack(self.task_weights)
        updated = tf.maximum(updated, self.MIN_WEIGHT * tf.reduce_mean(updated))
        updated *= count / tf.reduce_sum(updated)
        for variable, value in zip(self.task_weights, tf.unstack(updated)):
            variable.assign(value)
        self.weights.assign(updated)
        return pairs


class PCGrad(Balance):
    """Yu et al. (NeurIPS 2020), Algorithm 1: for each task i, g_i^PC starts as its trunk
    gradient g_i; for every other task j, in random order, if g_i^PC . g_j < 0 then
    g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j, with g_j the original; the trunk's update is
    sum_i g_i^PC. The order is shuffled per task and step (their Appendix H), from the
    run's seed and the step. Heads and weight decay keep their plain gradients.

    Every g_i^PC stays a linear combination of the original g_j, so the projections run on
    the tasks' Gram matrix of dot products (T x T) and the update is sum_j c_j g_j: no
    flattened copy of the trunk per task. `weights` shows the c_j.
    """

    name = "pcgrad"
    needs_task_gradients = True
    replaces_trunk_gradient = True

    def _update(self, pairs: list[tuple[tf.Tensor, tf.Variable]], sums: list[tf.Tensor],
                shared: Sequence[tf.Variable], step: tf.Tensor,
                task_gradients: tuple[list[list[tf.Tensor]], tf.Tensor] | None) -> list[tuple[tf.Tensor, tf.Variable]]:
        gradients, gram = task_gradients
        coefficients = projected_coefficients(gram, self.seed, step)
        self.weights.assign(coefficients)
        position = {id(v): index for index, v in enumerate(shared)}
        balanced = []
        for head_gradient, variable in pairs:
            if id(variable) not in position:
                balanced.append((head_gradient, variable))
                continue
            index = position[id(variable)]
            combined = tf.add_n([coefficients[k] * gradients[k][index] for k in range(len(gradients))]) + sums[index]
            balanced.append((tf.cast(combined, variable.dtype), variable))
        return balanced

    def _to_sum(self, gradient: Gradient, shares: dict[str, tf.Tensor], shared: Sequence[tf.Variable]) -> list[tf.Tensor]:
        # Weight decay of the trunk, which the projections leave alone.
        return [tf.zeros_like(v, tf.float32) if g is None else tf.cast(g, tf.float32)
                for g, v in zip(gradient(REGULARIZATION, shared), shared)]


def projected_coefficients(gram: tf.Tensor, seed: int, step: tf.Tensor) -> tf.Tensor:
    """PCGrad on a Gram matrix: c with sum_i g_i^PC = sum_j c_j g_j (see `PCGrad`)."""
    count = gram.shape[0]
    eye = tf.eye(count)
    orders = task_orders(count, seed, step)
    rows = []
    for i in range(count):
        row = eye[i]
        for position in range(count):
            j = orders[i, position]
            dot = tf.reduce_sum(row * gram[:, j])
            conflict = tf.logical_and(dot < 0, tf.not_equal(j, i))
            scale = tf.where(conflict, dot / tf.maximum(gram[j, j], 1e-30), 0.0)
            row -= scale * tf.one_hot(j, count)
        rows.append(row)
    return tf.reduce_sum(tf.stack(rows), axis=0)


def task_orders(count: int, seed: int, step: tf.Tensor) -> tf.Tensor:
    """[count, count]: row i, the order in which task i meets the tasks (itself included,
    skipped), drawn from (seed, step)."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.argsort(tf.random.stateless_uniform([count, count], seed=key), axis=1)


def last_shared_layer(shared: Sequence[tf.Variable]) -> tf.Variable:
    """GradNorm's W: the last conv weights the trunk creates (block3's last unit's conv3)."""
    weights = [v for v in shared if slim_name(v).endswith("/weights")]
    if not weights:
        raise MtssError("--balance gradnorm needs trunk conv weights that train, and --trainable_scopes leaves "
                        "the trunk none; train block3 at least, or choose another --balance")
    return weights[-1]


def _optimizer_variables(optimizer: tf_keras.optimizers.Optimizer) -> dict[str, tf.Variable]:
    """A balance optimizer's step count and slots, by checkpoint name under `balance/optimizer/`."""
    named = {f"{SCOPE}optimizer/iterations": optimizer.iterations}
    for slot in optimizer.variables():  # Named '<slot>/balance/<task>/<weight>'.
        if slot is not optimizer.iterations:
            named[f"{SCOPE}optimizer/{slim_name(slot).replace(SCOPE, '', 1)}"] = slot
    return named


# The cosine the picture shows at full colour: between tasks they are often a few hundredths.
FULL_COLOUR_COSINE = 0.25


def picture(cosines: tf.Tensor, pixels_per_cell: int = 32) -> tf.Tensor:
    """The task x task matrix of gradient cosines as one [1, T*p, T*p, 3] picture in [0, 1],
    rows and columns in the tasks' order: blue where two tasks' gradients agree, red where
    they conflict, white where they are orthogonal, full colour from |cosine| >=
    FULL_COLOUR_COSINE on (the same scale at every step; the scalars
    `balance/cosine/<task>_<task>` give the values). The diagonal is full blue."""
    scaled = tf.clip_by_value(tf.cast(cosines, tf.float32) / FULL_COLOUR_COSINE, -1.0, 1.0)
    positive, negative = tf.nn.relu(scaled), tf.nn.relu(-scaled)
    rgb = tf.stack([1.0 - positive, 1.0 - positive - negative, 1.0 - negative], axis=-1)
    cells = tf.repeat(tf.repeat(rgb, pixels_per_cell, axis=0), pixels_per_cell, axis=1)
    return cells[tf.newaxis]


def make_balance(name: str, task_names: Sequence[str], seed: int, learning_rate: float, alpha: float) -> Balance:
    """The balance `--balance` names (create under the strategy's scope)."""
    if name == "uncertainty":
        return Uncertainty(task_names, seed, learning_rate)
    if name == "gradnorm":
        return GradNorm(task_names, seed, learning_rate, alpha)
    if name == "pcgrad":
        return PCGrad(task_names, seed)
    return Balance(task_names, seed)
