"""The multi-task network: one shared slim trunk and one slim head per task."""

import functools
from typing import Sequence

from mtss_train.model import colorspace, lasso, trunk
from mtss_train.compat import slim, tf
from mtss_train.model.slim_layer import SlimLayer, slim_name
from mtss_train.task import Batch, Task


class MultiTaskModel:
    """Trunk (`resnet_v2_101/...`) and heads (`<task>_head/...`) as separate slim layers.

    Separate layers keep each head's weight-decay losses apart, so a step of one task
    decays the trunk and its own head, never the idle heads of other tasks.

    Every task's images reach the trunk through `trunk_input` (VGG preprocessing, and
    harmonization: with `harmonize`, tasks whose `harmonize_to_grey` is set see L only, as
    colorization does), and the trunk runs at the task's own output stride
    (`config.output_stride`, else `output_stride`) over one set of variables. With
    `lasso_l1`, each head reads the lasso mix of block3's units (see `mtss_train.model.lasso`).
    With `freeze_batch_norm`, every BatchNorm (trunk and heads) runs in inference mode also
    in training calls; a head still gets `is_training` for anything else it switches.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        trunk_size: str = "101",
        output_stride: int | None = None,
        weight_decay: float = 1e-4,
        batch_norm_decay: float = 0.997,
        dtype_policy: str = "float32",
        harmonize: bool = False,
        lasso_l1: float | None = None,
        freeze_batch_norm: bool = False,
    ):
        self.tasks = {t.name: t for t in tasks}
        self.harmonize = harmonize
        self.lasso = lasso_l1 is not None
        self.output_strides = {t.name: t.config.output_stride or output_stride for t in tasks}
        arg_scope = functools.partial(trunk.trunk_arg_scope, weight_decay, batch_norm_decay)

        def head_fn(block3: tf.Tensor, is_training: bool, task: Task, end_points: dict, batch: Batch) -> dict:
            with slim.arg_scope(arg_scope()), slim.arg_scope(
                [slim.batch_norm], is_training=is_training and not freeze_batch_norm
            ), tf.compat.v1.variable_scope(task.head_scope):
                if lasso_l1 is not None:
                    block3 = lasso.mix_units(block3, end_points, lasso_l1)
                return task.head(block3, end_points, batch, is_training)

        self.trunk = SlimLayer(
            trunk.block3_net(trunk_size, None, weight_decay, batch_norm_decay, freeze_batch_norm),
            name="trunk", dtype=dtype_policy,
        )
        self.heads = {
            t.name: SlimLayer(functools.partial(head_fn, task=t), name=t.head_scope, dtype=dtype_policy)
            for t in tasks
        }

    def harmonized(self, task_name: str) -> bool:
        """Whether harmonization turns this task's input grey (a grey input already is)."""
        task = self.tasks[task_name]
        return self.harmonize and task.harmonize_to_grey and task.input_colour == "rgb"

    def trunk_images(self, task_name: str, batch: Batch) -> tf.Tensor:
        """The task's RGB images in [0, 255], grey (L only) if harmonized."""
        images = self.tasks[task_name].trunk_images(batch)
        return colorspace.grey_rgb(images) if self.harmonized(task_name) else images

    def trunk_input(self, task_name: str, batch: Batch) -> tf.Tensor:
        """What the trunk sees for a batch of `task_name`: `trunk_images`, VGG-preprocessed."""
        return trunk.vgg_preprocess(self.trunk_images(task_name, batch))

    def lasso_alphas(self) -> dict[str, tf.Variable]:
        """Each task's lasso weights over block3's units (empty without the lasso)."""
        alphas = {}
        for name, head in self.heads.items():
            found = [v for key, v in head.variables_by_name().items() if key.endswith("/" + lasso.ALPHA)]
            alphas.update({name: found[0]} if found else {})
        return alphas

    def summaries(self, task_names: Sequence[str]) -> tuple[
            dict[str, tf.Tensor], dict[str, dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
        """What the model shows of itself in TensorBoard, for `task_names` in that order:
        (scalars {tag: value}, pictures {group: {name: [K, H, W, 3] in [0, 1]}}, histograms
        {tag: values}); the lasso's weights (`lasso.summaries`), nothing without the lasso."""
        alphas = self.lasso_alphas()
        if not alphas:
            return {}, {}, {}
        return lasso.summaries({name: alphas[name] for name in task_names if name in alphas})

    def features(self, task_name: str, batch: Batch, training: bool) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """(block3, trunk end points) for a batch of `task_name`, at its output stride."""
        return self.trunk(
            self.trunk_input(task_name, batch), training=training, output_stride=self.output_strides[task_name]
        )

    def __call__(self, task_name: str, batch: Batch, training: bool) -> dict[str, tf.Tensor]:
        block3, end_points = self.features(task_name, batch, training)
        return self.heads[task_name](block3, training=training, end_points=end_points, batch=batch)

    def regularization_loss(self, task_names: Sequence[str]) -> tf.Tensor:
        """Weight decay (and lasso penalty) of the trunk and the heads of `task_names`."""
        layers = [self.trunk] + [self.heads[name] for name in task_names]
        losses = [tf.cast(loss, tf.float32) for layer in layers for loss in layer.losses]
        return tf.add_n(losses) if losses else tf.constant(0.0)

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """Every model variable (trunk and all heads, incl. BN statistics) by slim name."""
        named = dict(self.trunk.variables_by_name())
        for head in self.heads.values():
            named.update(head.variables_by_name())
        return named

    def trainable_variables(self, task_names: Sequence[str], scopes: Sequence[str] = ()) -> list[tf.Variable]:
        """What a step of `task_names` trains: trunk + their heads, limited to `scopes` if given."""
        candidates = self.trunk.trainable_variables + [
            v for name in task_names for v in self.heads[name].trainable_variables]
        return [v for v in candidates if not scopes or slim_name(v).startswith(tuple(scopes))]
