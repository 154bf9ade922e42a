"""The training state: the model, the optimizer, and the checkpoints that hold them.

A checkpoint holds every model variable under its slim name, `global_step` (the
optimizer's iteration count) and the optimizer's slots under `optimizer/<slim name>`.
Resume and warm start follow tensorflow/models slim: a checkpoint in the train dir wins;
otherwise `init_checkpoint` warm-starts the model variables it matches.
"""

from typing import Sequence

from absl import logging

from mtss_train import checkpoints, trunk
from mtss_train.compat import tf
from mtss_train.config import TrainConfig
from mtss_train.model import MultiTaskModel
from mtss_train.optim import make_optimizer
from mtss_train.slim_layer import slim_name
from mtss_train.task import Batch, Task

GLOBAL_STEP = "global_step"
OPTIMIZER_SCOPE = "optimizer/"


class TrainingState:
    """Builds the model and optimizer under `strategy`; restores and saves them.

    Variables exist only after `build`, which runs one forward pass per task.
    """

    def __init__(self, config: TrainConfig, tasks: Sequence[Task], strategy: tf.distribute.Strategy, chief: bool):
        self.config = config
        self.tasks = list(tasks)
        self.strategy = strategy
        self.chief = chief
        self.built = False
        with strategy.scope():
            self.model = MultiTaskModel(
                tasks, config.trunk_size, config.output_stride, config.weight_decay, config.batch_norm_decay,
                dtype_policy="float32" if config.precision == "float32" else f"mixed_{config.precision}",
                harmonize=config.harmonize, lasso_l1=config.lasso_l1 if config.lasso else None,
            )
            self.optimizer = make_optimizer(config)

    @property
    def step(self) -> int:
        """The global step: how many steps the optimizer has applied."""
        return int(self.optimizer.iterations.numpy())

    def variables(self) -> dict[str, tf.Variable]:
        """Everything a checkpoint holds, by name: model, global step, optimizer slots."""
        state = self.model.variables_by_name()
        state[GLOBAL_STEP] = self.optimizer.iterations
        for variable in self.optimizer.variables():
            if variable is not self.optimizer.iterations:
                state[OPTIMIZER_SCOPE + slim_name(variable)] = variable
        return state

    def build(self, batches: dict[str, Batch]) -> None:
        """Creates every variable: the model by one forward pass per task, optimizer slots."""
        for task in self.tasks:
            local = self.strategy.experimental_local_results(batches[task.name])[0]
            with self.strategy.scope():
                self.model(task.name, local, training=False)
        with self.strategy.scope():
            self.optimizer.build(self.model.trainable_variables([t.name for t in self.tasks]))
        self.built = True

    def checkpoint_step(self) -> int:
        """The global step a resume would start from (0 if the train dir has no checkpoint)."""
        latest = checkpoints.latest(self.config.train_dir)
        if latest is None or GLOBAL_STEP not in checkpoints.read_specs(latest):
            return 0
        return int(checkpoints.read_tensors(latest, [GLOBAL_STEP])[GLOBAL_STEP])

    def restore(self) -> int:
        """Resumes from the train dir, else warm-starts from init_checkpoint; returns the step."""
        config = self.config
        latest = checkpoints.latest(config.train_dir)
        if latest:
            if config.init_checkpoint:
                logging.info("resuming from %s; --init_checkpoint is ignored", latest)
            report = checkpoints.restore_variables(
                self.variables(), latest, required_scopes=trunk.TRUNK_SCOPES + (GLOBAL_STEP,)
            )
            logging.info("resumed from %s at step %d:\n%s", latest, self.step, report.format())
        elif config.init_checkpoint:
            # A warm start that misses trunk weights is a wrong checkpoint, not a fresh start.
            required = [s for s in trunk.TRUNK_SCOPES if not s.startswith(tuple(config.exclude_scopes))]
            report = checkpoints.restore_variables(
                self.model.variables_by_name(), config.init_checkpoint,
                exclude_scopes=config.exclude_scopes, required_scopes=required,
            )
            logging.info("warm start from %s:\n%s", config.init_checkpoint, report.format())
        return self.step

    def save(self, step: int) -> str | None:
        """Writes a checkpoint (chief only); returns its prefix, None on other workers."""
        # Every worker reads (sync-on-read BN statistics all-reduce); only the chief writes.
        values = {name: v.read_value() for name, v in self.variables().items()}
        if not self.chief:
            return None
        return checkpoints.save(self.config.train_dir, values, step, self.config.keep_checkpoints)
