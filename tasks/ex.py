"""Exemplar (Dosovitskiy, Springenberg, Riedmiller & Brox, "Discriminative Unsupervised
Feature Learning with Convolutional Neural Networks", NIPS 2014), trained with a triplet
loss as in the multi-task paper (Doersch & Zisserman, ICCV 2017).

Every image is its own class. An example is `views` strongly augmented views of one seed
patch of an image (tasks/ex_augment.py: crop, scale, rotation, flip, colour, hue, saturation
and contrast jitter with the ranges of Dosovitskiy et al.). Each view goes through the trunk
(views fold into the batch), a small head pools block3 into an L2-normalised embedding, and
the loss pulls views of one image together and pushes them from the other images' views.

Loss (`loss`): `triplet` (default) with a margin on squared Euclidean distances between
unit embeddings (in [0, 4]; margin 0.5 as the exemplar triplet setup of Kolesnikov et al.
2019, "Revisiting self-supervised visual representation learning"), with the triplets
picked by `mining`:
  * `all` (default): every (anchor, positive, negative); an image's loss is the mean over
    its triplets that violate the margin (hinge > 0), "batch all" of Hermans et al. 2017;
  * `hard`: per anchor the farthest positive and the closest negative (Hermans et al.);
  * `semihard`: per (anchor, positive) the closest negative that is farther than the
    positive; if none is, the farthest negative (Schroff et al. 2015, FaceNet).
or `infonce`: softmax over all other views of the batch at temperature `temperature`,
averaged over the positives of each anchor (NT-Xent with several positives). `all` is the
default mining because it learned fastest in short runs on the bundled photos (in-batch
retrieval after 600 tiny-trunk steps with the full jitter: all 0.27, infonce 0.24,
semihard 0.19; chance 0.03). The triplet loss stays the default, as the multi-task paper's.
On the small-scale reproduction's linear probe (README, issue 27; 1,500 steps, 3 seeds)
`infonce` did better: validation 0.8748 against 0.8732, test 0.8688 against 0.8629, and
beside rp it raised rp+ex by 0.75 points; in a seed-0 screen semihard (0.8545) and hard
(0.8320) mining scored below `all` (0.8605, validation).

Kolesnikov et al.'s exemplar (google/revisiting-self-supervised, config/exemplar/imagenet.sh
and self_supervision/exemplar.py) takes 8 views of each of 64 images per batch, FaceNet's
semi-hard mining (`triplet_semihard_loss`) and margin 0.5, with a 1000-d embedding. We keep
the margin, and default to 2 views and `all` mining: at a fixed number of trunk images per
step, 2 views give 4 times as many images, i.e. negatives, per batch, and semi-hard learned
slowest here (above). `--task_param ex.views=8 --task_param ex.mining=semihard` gives their
setting. (Their code L2-normalises each embedding dimension across the batch, axis 0, not
each embedding; ours normalises each embedding, as the triplet loss on unit vectors assumes.)

Anchors are this replica's views; candidates (positives and negatives) are the views of the
GLOBAL batch: under several replicas the embeddings are gathered across replicas
(`ReplicaContext.all_gather`, which passes gradients back to their replica), unless
`gather_replicas` is false, when each replica only sees its own images as negatives. The
per-example loss is one value per image: the mean of its anchors' terms.

    python -m mtss_train --tasks ex --task_param ex.mining=hard --task_param ex.views=4
"""

import dataclasses

from mtss_train import seeds
from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError
from mtss_train.task import Batch, Task, TaskConfig, register_task
from mtss_train.tasks.ex_augment import Augmentation

LOSSES = ("triplet", "infonce")
MINING = ("all", "hard", "semihard")
# Stands in for "no such pair": finite, so differences of two of them are not NaN.
_FAR = 1e9


@register_task
class Exemplar(Task):
    name = "ex"
    source_kind = "images"
    # Colour is part of what the views vary, so the trunk sees RGB, also under --harmonize
    # (harmonize_to_grey stays False).
    input_colour = "rgb"

    @dataclasses.dataclass
    class Config(TaskConfig):
        views: int = 2  # Views per image (>= 2: one anchor needs a positive).
        crop_size: int = 96  # Side of a view.
        # Augmentations (tasks/ex_augment.py; ranges from Dosovitskiy et al. 2014).
        seed_fraction: tuple[float, ...] = (0.3, 0.6)  # Seed patch side / shorter image side.
        scale: tuple[float, ...] = (0.7, 1.4)
        translation: float = 0.2
        rotation_degrees: float = 20.0
        flip: bool = True
        pca_factor: float = 2.0
        sv_power: float = 4.0
        sv_factor: tuple[float, ...] = (0.7, 1.4)
        sv_shift: float = 0.1
        hue_shift: float = 0.1
        # Head and loss.
        head_width: int = 512
        embedding_dim: int = 128
        loss: str = "triplet"  # One of LOSSES.
        mining: str = "all"  # One of MINING (triplet loss only).
        margin: float = 0.5
        temperature: float = 0.1  # infonce only.
        gather_replicas: bool = True  # Negatives from the global batch, not just this replica's.

        def validate(self) -> None:
            super().validate()
            if self.batch_size < 2:
                raise MtssError(f"ex.batch_size must be >= 2 (other images are the negatives), got {self.batch_size}")
            if self.views < 2:
                raise MtssError(f"ex.views must be >= 2, got {self.views}")
            if self.crop_size < 8:
                raise MtssError(f"ex.crop_size must be >= 8, got {self.crop_size}")
            if self.loss not in LOSSES:
                raise MtssError(f"ex.loss must be one of {LOSSES}, got {self.loss!r}")
            if self.mining not in MINING:
                raise MtssError(f"ex.mining must be one of {MINING}, got {self.mining!r}")
            if self.margin <= 0 or self.temperature <= 0:
                raise MtssError("ex.margin and ex.temperature must be > 0")
            for field, low in (("seed_fraction", 0.0), ("scale", 0.0), ("sv_factor", 0.0)):
                value = getattr(self, field)
                if len(value) != 2 or not low < value[0] <= value[1]:
                    raise MtssError(f"ex.{field} must be two numbers low,high with {low} < low <= high, got {value}")
            if self.seed_fraction[1] > 1:
                raise MtssError(f"ex.seed_fraction must be <= 1, got {self.seed_fraction}")
            if self.pca_factor < 1 or self.sv_power < 1:
                raise MtssError("ex.pca_factor and ex.sv_power must be >= 1 (ranges [1/x, x])")
            if min(self.translation, self.rotation_degrees, self.sv_shift, self.hue_shift) < 0:
                raise MtssError("ex.translation, rotation_degrees, sv_shift and hue_shift must be >= 0")

    @property
    def augmentation(self) -> Augmentation:
        c = self.config
        return Augmentation(
            size=c.crop_size, seed_fraction=tuple(c.seed_fraction), scale=tuple(c.scale),
            translation=c.translation, rotation_degrees=c.rotation_degrees, flip=c.flip,
            pca_factor=c.pca_factor, sv_power=c.sv_power, sv_factor=tuple(c.sv_factor),
            sv_shift=c.sv_shift, hue_shift=c.hue_shift,
        )

    def make_dataset(self, source: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        """Batches of {'views': [batch_size, V, S, S, 3] float32 RGB in [0, 255]}."""
        augmentation, views = self.augmentation, self.config.views
        examples = seeds.map_with_seeds(
            source, lambda image, example_seed: {"views": augmentation.views(image, example_seed, views)}, seed
        )
        return examples.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def trunk_images(self, batch: Batch) -> tf.Tensor:
        s = self.config.crop_size
        return tf.reshape(batch["views"], [-1, s, s, 3])  # [N*V, S, S, 3]: views fold into the batch.

    def head(self, block3: tf.Tensor, end_points: dict[str, tf.Tensor], batch: Batch,
             is_training: bool) -> dict[str, tf.Tensor]:
        """{'embedding': [N*V, embedding_dim] float32, unit length}."""
        c = self.config
        # Pre-activation block3 is a raw residual sum: normalise it first, as slim's postnorm.
        net = slim.batch_norm(block3, activation_fn=tf.nn.relu, scope="preact")
        net = tf.reduce_mean(net, axis=[1, 2], keepdims=True)
        net = slim.conv2d(net, c.head_width, [1, 1], scope="fc1")
        net = slim.conv2d(net, c.embedding_dim, [1, 1], activation_fn=None, normalizer_fn=None, scope="embed")
        embedding = tf.cast(tf.squeeze(net, [1, 2]), tf.float32)
        return {"embedding": tf.math.l2_normalize(embedding, axis=-1)}

    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        c = self.config
        anchors = tf.cast(outputs["embedding"], tf.float32)
        candidates, first_row = gather_candidates(anchors, c.gather_replicas)
        anchor_rows = first_row + tf.range(tf.shape(anchors)[0])
        distances = squared_distances(anchors, candidates)
        if c.loss == "triplet":
            terms = triplet_terms(distances, anchor_rows, c.views, c.margin, c.mining)
        else:
            terms = infonce_terms(distances, anchor_rows, c.views, c.temperature)
        metrics = {
            "triplets_meeting_margin": per_image(*margin_met(distances, anchor_rows, c.views, c.margin), c.views),
            "retrieval_accuracy": retrieval_accuracy(distances, anchor_rows, c.views),
        }
        return per_image(*terms, c.views), metrics

    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        views = batch["views"][:4]  # [K, V, S, S, 3]
        return {"views": tf.concat(tf.unstack(views, axis=1), axis=2) / 255.0}  # Side by side.


def gather_candidates(embeddings: tf.Tensor, gather: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """The embeddings of all replicas' views, and the row where this replica's start.

    Args:
      embeddings: [A, D] this replica's views, image-major (row = image * V + view).
      gather: whether to gather across replicas (else only this replica's views).

    Returns:
      (candidates [K, D], int32 scalar: row of embeddings[0] in candidates). K = A times the
      number of replicas in sync when gathering, else A.
    """
    context = tf.distribute.get_replica_context()
    if not gather or context is None or context.num_replicas_in_sync == 1:
        return embeddings, tf.constant(0)
    candidates = context.all_gather(embeddings, axis=0)  # Replica order; gradients flow back.
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return candidates, replica * tf.shape(embeddings)[0]


def squared_distances(anchors: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
    """[A, K] squared Euclidean distances between rows of [A, D] and [K, D]."""
    dot = tf.matmul(anchors, candidates, transpose_b=True)
    norms_a = tf.reduce_sum(tf.square(anchors), -1, keepdims=True)
    norms_c = tf.reduce_sum(tf.square(candidates), -1)[None]
    return tf.maximum(norms_a - 2.0 * dot + norms_c, 0.0)  # Rounding can dip below 0.


def _pairs(distances: tf.Tensor, anchor_rows: tf.Tensor, views: int) -> tuple[tf.Tensor, ...]:
    """Positives and negatives of each anchor; candidates are image-major (row = image * V + view).

    Returns:
      positive [A, V]: distance to each view of the anchor's image; positive_mask [A, V]:
      which of those are other views (not the anchor itself); negative_mask [A, K]: which
      candidates are views of other images.
    """
    image = anchor_rows // views
    by_image = tf.reshape(distances, [tf.shape(distances)[0], -1, views])  # [A, K / V, V]
    positive = tf.gather(by_image, image, batch_dims=1)
    positive_mask = tf.not_equal(tf.range(views)[None], (anchor_rows % views)[:, None])
    candidate_image = tf.range(tf.shape(distances)[1]) // views
    negative_mask = tf.not_equal(candidate_image[None], image[:, None])
    return positive, positive_mask, negative_mask


def triplet_terms(distances: tf.Tensor, anchor_rows: tf.Tensor, views: int, margin: float,
                  mining: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-anchor sums of triplet hinge losses max(d(a,p) - d(a,n) + margin, 0) and how many
    terms each sum averages over (see the module docstring for the mining modes).

    Args:
      distances: [A, K] squared distances from the anchors to all candidates.
      anchor_rows: [A] int32 row of each anchor among the candidates.
      views: views per image V (candidates are image-major).
      margin: the triplet margin.
      mining: one of MINING.

    Returns:
      (sums [A], counts [A]) float32: 'all' counts the violating triplets, 'hard' counts 1
      per anchor, 'semihard' counts the anchor's positives.
    """
    positive, positive_mask, negative_mask = _pairs(distances, anchor_rows, views)
    has_negative = tf.reduce_any(negative_mask, -1)
    if mining == "hard":
        hardest_positive = tf.reduce_max(tf.where(positive_mask, positive, -_FAR), -1)
        hardest_negative = tf.reduce_min(tf.where(negative_mask, distances, _FAR), -1)
        hinge = tf.nn.relu(hardest_positive - hardest_negative + margin)
        return hinge, tf.cast(tf.reduce_any(positive_mask, -1) & has_negative, tf.float32)
    # [A, V, K]: triplet (anchor, positive view v, candidate k).
    gap = distances[:, None, :] - positive[:, :, None]
    valid = positive_mask[:, :, None] & negative_mask[:, None, :]
    if mining == "all":
        hinge = tf.where(valid, tf.nn.relu(margin - gap), 0.0)
        return tf.reduce_sum(hinge, [1, 2]), tf.reduce_sum(tf.cast(hinge > 0, tf.float32), [1, 2])
    if mining != "semihard":
        raise MtssError(f"ex.mining must be one of {MINING}, got {mining!r}")
    farther = valid & (gap > 0)
    semi_hard = tf.reduce_min(tf.where(farther, distances[:, None, :], _FAR), -1)
    easiest = tf.reduce_max(tf.where(negative_mask, distances, -_FAR), -1, keepdims=True)
    negative = tf.where(tf.reduce_any(farther, -1), semi_hard, easiest)
    used = positive_mask & has_negative[:, None]
    hinge = tf.where(used, tf.nn.relu(positive - negative + margin), 0.0)
    return tf.reduce_sum(hinge, -1), tf.reduce_sum(tf.cast(used, tf.float32), -1)


def infonce_terms(distances: tf.Tensor, anchor_rows: tf.Tensor, views: int,
                  temperature: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-anchor sums over positives of -log softmax(cosine / temperature) among all other
    candidates, and the number of positives. Embeddings must be unit length (cos = 1 - d/2).

    Returns:
      (sums [A], counts [A]) float32.
    """
    positive, positive_mask, _ = _pairs(distances, anchor_rows, views)
    is_self = tf.equal(tf.range(tf.shape(distances)[1])[None], anchor_rows[:, None])
    logits = tf.where(is_self, -_FAR, (1.0 - distances / 2.0) / temperature)
    log_normaliser = tf.reduce_logsumexp(logits, -1, keepdims=True)
    losses = tf.where(positive_mask, log_normaliser - (1.0 - positive / 2.0) / temperature, 0.0)
    return tf.reduce_sum(losses, -1), tf.reduce_sum(tf.cast(positive_mask, tf.float32), -1)


def margin_met(distances: tf.Tensor, anchor_rows: tf.Tensor, views: int,
               margin: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per anchor: (how many of its triplets have d(a,n) >= d(a,p) + margin, how many it has)."""
    positive, positive_mask, negative_mask = _pairs(distances, anchor_rows, views)
    valid = positive_mask[:, :, None] & negative_mask[:, None, :]
    met = valid & (distances[:, None, :] - positive[:, :, None] >= margin)
    return tf.reduce_sum(tf.cast(met, tf.float32), [1, 2]), tf.reduce_sum(tf.cast(valid, tf.float32), [1, 2])


def retrieval_accuracy(distances: tf.Tensor, anchor_rows: tf.Tensor, views: int) -> tf.Tensor:
    """[N] per image: fraction of its views whose nearest other candidate is a view of it."""
    is_self = tf.equal(tf.range(tf.shape(distances)[1])[None], anchor_rows[:, None])
    nearest = tf.argmin(tf.where(is_self, _FAR, distances), -1, output_type=tf.int32)
    hit = tf.cast(tf.equal(nearest // views, anchor_rows // views), tf.float32)
    return tf.reduce_mean(tf.reshape(hit, [-1, views]), -1)


def per_image(sums: tf.Tensor, counts: tf.Tensor, views: int) -> tf.Tensor:
    """[N] sum of each image's V anchor sums over the sum of their counts (0 if none)."""
    return tf.math.divide_no_nan(
        tf.reduce_sum(tf.reshape(sums, [-1, views]), -1), tf.reduce_sum(tf.reshape(counts, [-1, views]), -1)
    )
