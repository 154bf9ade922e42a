"""The multi-task network: one shared slim trunk and one slim head per task."""

import functools
from typing import Sequence

from mtss_train import trunk
from mtss_train.compat import slim, tf
from mtss_train.slim_layer import SlimLayer, slim_name
from mtss_train.task import Batch, Task


class MultiTaskModel:
    """Trunk (`resnet_v2_101/...`) and heads (`<task>_head/...`) as separate slim layers.

    Separate layers keep each head's weight-decay losses apart, so a step of one task
    decays the trunk and its own head, never the idle heads of other tasks.

    Every task's images reach the trunk through `trunk_input` (VGG preprocessing), and
    the trunk runs at the task's own output stride (`config.output_stride`, else
    `output_stride`) over one set of variables.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        trunk_size: str = "101",
        output_stride: int | None = None,
        weight_decay: float = 1e-4,
        batch_norm_decay: float = 0.997,
        dtype_policy: str = "float32",
    ):
        self.tasks = {t.name: t for t in tasks}
        self.output_strides = {t.name: t.config.output_stride or output_stride for t in tasks}
        arg_scope = functools.partial(trunk.trunk_arg_scope, weight_decay, batch_norm_decay)

        def head_fn(block3: tf.Tensor, is_training: bool, task: Task, end_points: dict, batch: Batch) -> dict:
            with slim.arg_scope(arg_scope()), slim.arg_scope(
                [slim.batch_norm], is_training=is_training
            ), tf.compat.v1.variable_scope(task.head_scope):
                return task.head(block3, end_points, batch, is_training)

        self.trunk = SlimLayer(
            trunk.block3_net(trunk_size, None, weight_decay, batch_norm_decay), name="trunk", dtype=dtype_policy,
        )
        self.heads = {
            t.name: SlimLayer(functools.partial(head_fn, task=t), name=t.head_scope, dtype=dtype_policy)
            for t in tasks
        }

    def trunk_input(self, task_name: str, batch: Batch) -> tf.Tensor:
        """What the trunk sees for a batch of `task_name`: its images, VGG-preprocessed."""
        return trunk.vgg_preprocess(self.tasks[task_name].trunk_images(batch))

    def features(self, task_name: str, batch: Batch, training: bool) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """(block3, trunk end points) for a batch of `task_name`, at its output stride."""
        return self.trunk(
            self.trunk_input(task_name, batch), training=training, output_stride=self.output_strides[task_name]
        )

    def __call__(self, task_name: str, batch: Batch, training: bool) -> dict[str, tf.Tensor]:
        block3, end_points = self.features(task_name, batch, training)
        return self.heads[task_name](block3, training=training, end_points=end_points, batch=batch)

    def regularization_loss(self, task_name: str) -> tf.Tensor:
        losses = [tf.cast(loss, tf.float32) for loss in self.trunk.losses + self.heads[task_name].losses]
        return tf.add_n(losses) if losses else tf.constant(0.0)

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """Every model variable (trunk and all heads, incl. BN statistics) by slim name."""
        named = dict(self.trunk.variables_by_name())
        for head in self.heads.values():
            named.update(head.variables_by_name())
        return named

    def trainable_variables(self, task_name: str, scopes: Sequence[str] = ()) -> list[tf.Variable]:
        """What a step of `task_name` trains: trunk + its head, limited to `scopes` if given."""
        candidates = self.trunk.trainable_variables + self.heads[task_name].trainable_variables
        return [v for v in candidates if not scopes or slim_name(v).startswith(tuple(scopes))]
