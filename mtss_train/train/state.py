"""The training state: the model, the optimizer, and the checkpoints that hold them.

A checkpoint holds every model variable under its slim name, `global_step` (the
optimizer's iteration count) and the optimizer's slots under `optimizer/<slot>/<slim name>`
(with `--optimizer_state per_task`, the trunk's under `optimizer/per_task/<task>/`).
Resume and warm start follow tensorflow/models slim: a checkpoint in the train dir wins;
otherwise `init_checkpoint` warm-starts the model variables it matches. A resume restores
everything or fails: a variable whose shape differs is an error naming the setting that
changed, not a silent fresh start. Damaged newer checkpoints are skipped (and named); the
newest readable one wins.
"""

import os
from typing import Sequence

from absl import logging

from mtss_train.ckpt import checkpoint_files
from mtss_train.model import trunk
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig, changed_settings
from mtss_train.errors import CheckpointError, MtssError, UnreadableCheckpointError
from mtss_train.train.setting_errors import explained
from mtss_train.model.multitask import MultiTaskModel
from mtss_train.train.optim import PerTaskOptimizers, make_optimizer
from mtss_train.train.balance import make_balance
from mtss_train.model.slim_layer import slim_name
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
                freeze_batch_norm=config.freeze_batch_norm,
            )
            self.optimizer = make_optimizer(config)
            self.per_task = (PerTaskOptimizers(config, [t.name for t in tasks], self.optimizer.iterations)
                             if config.optimizer_state == "per_task" else None)
            self.balance = make_balance(config.balance, [t.name for t in tasks], config.seed,
                                        config.balance_learning_rate, config.gradnorm_alpha)
        self.unreadable: list[tuple[str, str]] = []  # Train-dir checkpoints skipped: (prefix, why).
        self._resume_from: str | None = None
        self._resume_searched = False

    @property
    def step(self) -> int:
        """The global step: how many steps the optimizer has applied."""
        return int(self.optimizer.iterations.numpy())

    def variables(self) -> dict[str, tf.Variable]:
        """Everything a checkpoint holds, by name: model, global step, optimizer slots,
        and what a --balance learns (under `balance/`)."""
        state = self.model.variables_by_name()
        state[GLOBAL_STEP] = self.optimizer.iterations
        for variable in self.optimizer.variables():
            if variable is not self.optimizer.iterations:
                state[OPTIMIZER_SCOPE + slim_name(variable)] = variable
        if self.per_task:
            state.update(self.per_task.checkpoint_variables(OPTIMIZER_SCOPE))
        state.update(self.balance.checkpoint_variables)
        return state

    def build(self, batches: dict[str, Batch]) -> None:
        """Creates every variable: the model by one forward pass per task, optimizer slots."""
        for task in self.tasks:
            local = self.strategy.experimental_local_results(batches[task.name])[0]
            with self.strategy.scope(), explained([task], "building the network on its first batch"):
                self.model(task.name, local, training=False)
        trained = self.model.trainable_variables([t.name for t in self.tasks])
        with self.strategy.scope():
            if self.per_task:  # The trunk's slots are the tasks' own.
                trunk_ids = {id(v) for v in self.model.trunk.trainable_variables}
                self.optimizer.build([v for v in trained if id(v) not in trunk_ids])
                self.per_task.build(self.model.trunk.trainable_variables)
            else:
                self.optimizer.build(trained)
            self.balance.build()
        self.built = True

    def resume_checkpoint(self) -> str | None:
        """The newest readable checkpoint in the train dir (None: start afresh), naming any
        newer unreadable one it skipped.

        Raises:
          CheckpointError: if the train dir has checkpoints and none of them is readable.
        """
        if not self._resume_searched:
            skipped = {prefix for prefix, _ in self.unreadable}
            prefix, newly = checkpoint_files.newest_readable(self.config.train_dir, exclude=skipped)
            for bad, why in newly:
                logging.warning("skipping the unreadable checkpoint %s: %s", bad, why)
            self.unreadable += newly
            if prefix is None and self.unreadable:
                raise CheckpointError(
                    f"none of the {len(self.unreadable)} checkpoint(s) in --train_dir {self.config.train_dir} "
                    f"is readable (the newest: {self.unreadable[0][1]}); move them away to start afresh"
                )
            self._resume_from, self._resume_searched = prefix, True
        return self._resume_from

    def checkpoint_step(self) -> int:
        """The global step a resume would start from (0 if the train dir has no checkpoint)."""
        prefix = self.resume_checkpoint()
        try:
            if prefix is None or GLOBAL_STEP not in checkpoint_files.read_specs(prefix):
                return 0
            return int(checkpoint_files.read_tensors(prefix, [GLOBAL_STEP])[GLOBAL_STEP])
        except UnreadableCheckpointError:
            return 0  # `restore` skips it and says so.

    def restore(self) -> int:
        """Resumes from the train dir, else warm-starts from init_checkpoint; returns the step."""
        config = self.config
        while self.resume_checkpoint():
            try:
                self._resume(self.resume_checkpoint())
                return self.step
            except UnreadableCheckpointError as e:  # Damage the size check could not see.
                logging.warning("skipping the unreadable checkpoint %s: %s", self._resume_from, e)
                self.unreadable.append((self._resume_from, str(e)))
                self._resume_searched = False
        if config.init_checkpoint:
            # A warm start that misses trunk weights is a wrong checkpoint, not a fresh start.
            required = [s for s in trunk.TRUNK_SCOPES if not s.startswith(tuple(config.exclude_scopes))]
            report = checkpoint_files.restore_variables(
                self.model.variables_by_name(), config.init_checkpoint,
                exclude_scopes=config.exclude_scopes, required_scopes=required,
            )
            logging.info("warm start from %s:\n%s", config.init_checkpoint, report.format())
        return self.step

    def _resume(self, prefix: str) -> None:
        if self.config.init_checkpoint:
            logging.info("resuming from %s; --init_checkpoint is ignored", prefix)
        variables = self.variables()
        report = checkpoint_files.match({n: checkpoint_files.spec_of(v) for n, v in variables.items()}, prefix)
        # Trunk slots under other names (another --optimizer_state) would silently start from zero.
        renamed = [[n for n in names if n.startswith(OPTIMIZER_SCOPE) and f"/{trunk.TRUNK_SCOPE}/" in n]
                   for names in (report.missing_in_checkpoint, report.unused_in_checkpoint)]
        if report.mismatched or all(renamed):
            raise CheckpointError(self._mismatch_message(report, *renamed))
        report = checkpoint_files.restore_variables(variables, prefix, required_scopes=trunk.TRUNK_SCOPES + (GLOBAL_STEP,))
        logging.info("resumed from %s at step %d:\n%s", prefix, self.step, report.format())

    def _mismatch_message(self, report: checkpoint_files.RestoreReport, missing: list[str], unused: list[str]) -> str:
        model_first = sorted(report.mismatched, key=lambda item: item[0].startswith(OPTIMIZER_SCOPE))
        examples = ", ".join(f"{name} {now} (checkpoint: {saved})" for name, now, saved in model_first[:3])
        differ = (f"{len(report.mismatched)} variable(s) differ in shape or dtype, e.g. {examples}"
                  if report.mismatched else
                  f"its optimizer slots have other names, e.g. {unused[0]} where this run has {missing[0]}")
        changed = changed_settings(os.path.join(self.config.train_dir, "flags.json"), self.config, self.tasks)
        fix = (f"settings changed since the run that wrote it (flags.json): {', '.join(changed)}; set them back"
               if changed else "restore the settings it was trained with (see flags.json in the train dir)")
        return (f"cannot resume from {report.checkpoint}: {differ}; {fix}, or use a new --train_dir (with "
                f"--init_checkpoint {report.checkpoint} to warm-start what still fits)")

    def set_aside_unreadable(self) -> None:
        """Moves the skipped unreadable checkpoints into `unreadable/`, so this run can save
        their steps again and later resumes do not trip over them."""
        for prefix, _ in self.unreadable:  # All found by listing the train dir.
            try:
                logging.warning("moved the unreadable checkpoint %s to %s", prefix, checkpoint_files.set_aside(prefix))
            except OSError as e:
                raise MtssError(f"cannot move the unreadable checkpoint {prefix} aside: {e.strerror}") from None
        self.unreadable = []

    def save(self, step: int) -> str | None:
        """Writes a checkpoint (chief only); returns its prefix, None on other workers."""
        # Every worker reads (sync-on-read BN statistics all-reduce); only the chief writes.
        values = {name: v.read_value() for name, v in self.variables().items()}
        if not self.chief:
            return None
        return checkpoint_files.save(self.config.train_dir, values, step, self.config.keep_checkpoints)
