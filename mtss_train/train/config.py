"""The training configuration: each setting declared once (type, default, help, choices), validated once."""

import dataclasses
import json
import math
from typing import Any, Sequence

from mtss_train.model import trunk
from mtss_train.train.balance import BALANCES
from mtss_train.data.files import write_atomically
from mtss_train.data.images import DEFAULT_MAX_PIXELS, TFRECORD_IMAGE_KEY
from mtss_train.errors import MtssError
from mtss_train.provenance import code_version
from mtss_train.task import Task, TaskConfig, make_config, task_class

CONFIG_VERSION = 1
OPTIMIZERS = ("rmsprop", "momentum")
OPTIMIZER_STATES = ("shared", "per_task")
LR_SCHEDULES = ("constant", "cosine", "step")
# Each step trains one task (in turn, or drawn by --task_weights), or all of them on the
# sum of their weighted losses.
SCHEDULES = ("round_robin", "weighted", "all")
STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server")
# Compute dtype of the network; variables, optimizer state and checkpoints stay float32.
PRECISIONS = ("float32", "bfloat16", "float16")


# The topics `python -m mtss_train --helpfull` lists the settings under, one heading each
# (config_flags.heading); a setting declares its own.
SETTING_GROUPS = ("run", "tasks and schedule", "data", "trunk and model", "optimizer", "checkpoints and logging",
                  "evaluation", "distribution")


def check_group(group: str) -> str:
    """`group`, if it is one of SETTING_GROUPS.

    Raises:
      ValueError: if it is none of them.
    """
    if group not in SETTING_GROUPS:
        raise ValueError(f"setting group {group!r} is none of {SETTING_GROUPS}")
    return group


def setting(default: Any = dataclasses.MISSING, *, group: str, help: str,  # noqa: A002  absl's name for it.
            default_factory: Any = dataclasses.MISSING, choices: Sequence[Any] = (),
            lower_bound: int | None = None, flag_default: Any = dataclasses.MISSING) -> Any:
    """A TrainConfig field together with how `python -m mtss_train` offers it (config_flags).

    Args:
      default, default_factory: as for `dataclasses.field`.
      group: the topic in SETTING_GROUPS whose heading lists the flag in --helpfull.
      help: the flag's help text.
      choices: the only values it takes (an enum flag); validate() refuses others.
      lower_bound: the least value the flag accepts (absl refuses smaller ones at parsing).
      flag_default: the command line's default of a field TrainConfig requires.

    Raises:
      ValueError: if `group` is none of SETTING_GROUPS.
    """
    metadata = {"group": check_group(group), "help": help, "choices": tuple(choices), "lower_bound": lower_bound,
                "flag_default": flag_default}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Trainer settings; task settings live in each task's Config.

    Each field is declared once, with its topic and help text: `python -m mtss_train` makes
    one flag of it (config_flags), listed under its topic. `task_params` is set by --task_param.
    """

    train_dir: str = setting(group="run", help="Checkpoints, flags.json and logs/ go here.", flag_default="runs/mtss")
    tasks: list[str] = setting(group="tasks and schedule", flag_default=["rp"],
                               help="Tasks to train: registered names or module.path:Class.")
    task_params: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # task -> field -> text
    data: str | None = setting(None, group="data", help="Image directory (recursive jpg/png) or TFRecords; default: "
                               "bundled sample photos.")
    eval_data: str | None = setting(None, group="evaluation", help="Held-out images: evaluated after every checkpoint "
                                    "(eval/ summaries).")
    eval_batches: int = setting(10, group="evaluation", help="Batches per task and evaluation.", lower_bound=1)
    image_key: str = setting(TFRECORD_IMAGE_KEY, group="data", help="TFRecord feature holding the encoded image.")
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, group="data", help="Images with more pixels are skipped and "
                                    "counted (read from the header, before decoding).")
    schedule: str = setting("round_robin", group="tasks and schedule", help="How each step picks its task.",
                            choices=SCHEDULES)
    task_weights: list[float] | None = setting(None, group="tasks and schedule", help="Sampling weight per task (with "
                                               "--schedule weighted).")
    max_steps: int = setting(200_000, group="run", help="Total steps over all tasks.")
    trunk_size: str = setting("101", group="trunk and model", help="Trunk.", choices=trunk.TRUNK_SIZES)
    output_stride: int | None = setting(None, group="trunk and model", help="Atrous block3 stride (default 32).",
                                        choices=(8, 16, 32))
    harmonize: bool = setting(False, group="trunk and model", help="Harmonization (paper 3.3): rp sees L only (grey), "
                              "as col does.")
    lasso: bool = setting(False, group="trunk and model", help="Lasso (paper Fig. 1b): each head reads a learned "
                          "sparse mix of block3's units.")
    # Ours, not the paper's (README); mtss_train.model.lasso applies it.
    lasso_l1: float = setting(0.3, group="trunk and model", help="Weight of the lasso's sparsity penalty ||alpha||_1 / "
                              "||alpha||_2 on each head's per-unit weights.")
    balance: str = setting("none", group="tasks and schedule", help="How a step of several tasks (--schedule all) "
                           "combines them on the trunk: the sum of their losses, learned uncertainty weights, GradNorm "
                           "or PCGrad (mtss_train.train.balance).", choices=BALANCES)
    balance_learning_rate: float = setting(0.025, group="tasks and schedule", help="Adam learning rate of the weights "
                                           "--balance uncertainty or gradnorm learns (the GradNorm paper's).")
    gradnorm_alpha: float = setting(1.5, group="tasks and schedule", help="GradNorm's asymmetry alpha: how much more "
                                    "gradient a task that trains slowly gets (the paper's NYUv2 value).")
    optimizer: str = setting("rmsprop", group="optimizer", help="Optimizer.", choices=OPTIMIZERS)
    optimizer_state: str = setting("shared", group="optimizer", help="The optimizer's slots of the trunk: one set that "
                                   "every task's steps update, or one set per task that only its steps update (heads "
                                   "have their own either way; mtss_train.train.optim.PerTaskOptimizers).",
                                   choices=OPTIMIZER_STATES)
    learning_rate: float = setting(1e-3, group="optimizer", help="Peak learning rate.")
    lr_schedule: str = setting("constant", group="optimizer", help="Learning-rate schedule.", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, group="optimizer", help="Linear warm-up steps (cosine schedule).")
    momentum: float = setting(0.9, group="optimizer", help="Momentum (RMSProp and SGD).")
    rmsprop_decay: float = setting(0.9, group="optimizer", help="RMSProp decay of the squared-gradient average.")
    rmsprop_epsilon: float = setting(1.0, group="optimizer", help="RMSProp epsilon (1.0 as in slim's "
                                     "train_image_classifier).")
    weight_decay: float = setting(1e-4, group="optimizer", help="L2 weight decay of conv weights.")
    batch_norm_decay: float = setting(0.997, group="trunk and model", help="BN moving-average decay.")
    # Small per-replica batches have noisy batch statistics; fine-tuning on them keeps the moving ones.
    freeze_batch_norm: bool = setting(False, group="trunk and model", help="BatchNorm (trunk and heads) uses and keeps "
                                      "its moving statistics; everything else trains. For fine-tuning with small "
                                      "per-replica batches.")
    clip_norm: float = setting(0.0, group="optimizer", help="Clip gradients to this global norm; 0 = off.")
    init_checkpoint: str | None = setting(None, group="checkpoints and logging", help="Warm start (e.g. the released "
                                          "model) when train_dir has no checkpoint.")
    exclude_scopes: list[str] = setting(default_factory=lambda: list(trunk.NOT_IN_TRUNK),
                                        group="checkpoints and logging", help="Variable scopes never warm-started.")
    trainable_scopes: list[str] = setting(default_factory=list, group="optimizer",
                                          help="Train only variables under these scopes (default all).")
    save_every_steps: int = setting(1000, group="checkpoints and logging", help="Checkpoint interval.")
    keep_checkpoints: int = setting(5, group="checkpoints and logging", help="Checkpoints kept.")
    summary_every_steps: int = setting(100, group="checkpoints and logging", help="TensorBoard interval.")
    log_every_steps: int = setting(10, group="checkpoints and logging", help="Console progress interval.")
    stop_check_every_steps: int = setting(10, group="distribution", help=(
        "--strategy multi_worker: how often the workers agree on SIGTERM/SIGINT (one tiny all-reduce), so all stop "
        "at the same step, the chief saves it, and each exits 128 + the signal."))
    seed: int = setting(0, group="run", help="Seed of data order, task schedule and augmentation.")
    deterministic: bool = setting(False, group="run", help="The same command, seed and machine give bit-identical "
                                  "checkpoints: TensorFlow's op determinism (README: its cost). Not with "
                                  "parameter_server.")
    strategy: str = setting("default", group="distribution", help="tf.distribute strategy.", choices=STRATEGIES)
    precision: str = setting("float32", group="trunk and model", help="Compute dtype (mixed precision: bfloat16 on "
                             "TPU/CPU/Ampere+, float16 with loss scaling on GPUs); weights stay float32.",
                             choices=PRECISIONS)
    version: int = dataclasses.field(default=CONFIG_VERSION, init=False)  # Of flags.json's layout; no setting.

    def validate(self) -> None:
        """Raises MtssError naming the first bad setting."""
        for field in dataclasses.fields(self):
            values = getattr(self, field.name)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, float) and not math.isfinite(value):
                    raise MtssError(f"--{field.name} must be finite, got {values}")
            choices = field.metadata.get("choices")
            unset = values is None and field.default is None
            if choices and values not in choices and not unset:
                raise MtssError(f"--{field.name} must be one of {choices}")
        checks = [
            (bool(self.tasks), "--tasks is empty"),
            (len(set(self.tasks)) == len(self.tasks), f"--tasks repeats a task: {self.tasks}"),
            (self.max_steps >= 1, "--max_steps must be >= 1"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (0 <= self.momentum < 1 and 0 < self.rmsprop_decay < 1,
             "--momentum must be in [0, 1) and --rmsprop_decay in (0, 1)"),
            (self.rmsprop_epsilon > 0, "--rmsprop_epsilon must be > 0"),
            (0 <= self.warmup_steps, "--warmup_steps must be >= 0"),
            (self.weight_decay >= 0 and self.clip_norm >= 0, "--weight_decay and --clip_norm must be >= 0"),
            (0 <= self.batch_norm_decay < 1, "--batch_norm_decay must be in [0, 1)"),
            (min(self.save_every_steps, self.summary_every_steps, self.log_every_steps,
                 self.stop_check_every_steps, self.keep_checkpoints) >= 1,
             "step intervals and --keep_checkpoints must be >= 1"),
            (self.eval_batches >= 1, "--eval_batches must be >= 1"),
            (self.lasso_l1 >= 0, "--lasso_l1 must be >= 0"),
            (self.balance_learning_rate > 0 and self.gradnorm_alpha >= 0,
             "--balance_learning_rate must be > 0 and --gradnorm_alpha >= 0"),
            (self.max_image_pixels >= 1, "--max_image_pixels must be >= 1"),
            (bool(self.image_key), "--image_key must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise MtssError(message)
        if self.deterministic and self.strategy == "parameter_server":
            raise MtssError("--deterministic cannot hold under --strategy parameter_server: its workers apply steps "
                            "asynchronously, in the order they finish, and draw their own seeds")
        if self.balance != "none" and (self.schedule != "all" or len(self.tasks) < 2):
            raise MtssError(f"--balance {self.balance} balances the tasks a step trains together: it needs "
                            "--schedule all and two tasks or more")
        if self.balance != "none" and self.strategy == "parameter_server":
            raise MtssError(f"--balance {self.balance} cannot run under --strategy parameter_server: its workers "
                            "apply their steps apart, each with its own copy of the learned weights; use "
                            "mirrored or multi_worker")
        if self.optimizer_state == "per_task":
            refusals = [(self.schedule == "all", "it needs --schedule round_robin or weighted: a step of --schedule "
                         "all trains every task at once"),
                        (self.precision == "float16", "float16's loss scaling belongs to one optimizer: use bfloat16"),
                        (self.strategy == "parameter_server", "--strategy parameter_server is not supported")]
            for refused, why in refusals:
                if refused:
                    raise MtssError(f"--optimizer_state per_task keeps each task's trunk slots for the steps it "
                                    f"trains alone; {why} (or pass --optimizer_state shared)")
        if self.task_weights is not None:
            if self.schedule != "weighted":
                raise MtssError("--task_weights needs --schedule weighted")
            if len(self.task_weights) != len(self.tasks) or min(self.task_weights) < 0 or not sum(self.task_weights) > 0:
                raise MtssError(
                    f"--task_weights needs one non-negative weight per task ({len(self.tasks)}), "
                    f"not all zero; got {self.task_weights}"
                )
        unknown = set(self.task_params) - set(self.tasks) - {task_class(t).name for t in self.tasks}
        if unknown:
            raise MtssError(f"--task_param names task(s) not in --tasks: {sorted(unknown)}")


# `--smoke`: a run small enough for a laptop CPU, where the user did not set these (each
# task adds its own `smoke_settings`). Short runs need fast BN moving averages, or
# inference-mode outputs lag far behind.
SMOKE_SETTINGS = {"max_steps": 200, "trunk_size": "tiny", "save_every_steps": 100, "summary_every_steps": 20,
                  "batch_norm_decay": 0.9}


def build_tasks(config: TrainConfig) -> list[Task]:
    """Instantiates the configured tasks with their overridden, validated configs."""
    tasks = []
    for spec in config.tasks:
        cls = task_class(spec)
        overrides = {**config.task_params.get(cls.name, {}), **config.task_params.get(spec, {})}
        if config.harmonize and cls.harmonize_to_grey:
            overrides = _harmonized(cls, overrides)
        task_config = make_config(cls, overrides)
        for field in dataclasses.fields(task_config):
            value = getattr(task_config, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise MtssError(f"{cls.name}.{field.name} must be finite, got {value}")
        try:
            tasks.append(cls(task_config))
        except MtssError as e:
            raise MtssError(f"task {cls.name}: {e}") from None
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise MtssError(f"two tasks share a name: {names}")
    return tasks


def _harmonized(cls: type[Task], overrides: dict[str, str]) -> dict[str, str]:
    """`overrides` plus the settings --harmonize makes for task `cls`.

    Raises:
      MtssError: if the user set one of them to something else.
    """
    for key, value in cls.harmonized_settings.items():
        if key in overrides and overrides[key] != value:
            raise MtssError(f"--harmonize sets {cls.name}.{key}={value} (the task sees L only); "
                            f"drop --task_param {cls.name}.{key}={overrides[key]} or --harmonize")
    return {**overrides, **cls.harmonized_settings}


def resolved(config: TrainConfig, tasks: list[Task]) -> dict:
    """Every resolved setting, trainer and tasks, as flags.json holds it."""
    values = dataclasses.asdict(config)
    values["commit"] = code_version()  # The code that trained it; not a setting (changed_settings ignores it).
    values["task_configs"] = {t.name: dataclasses.asdict(t.config) for t in tasks}
    return json.loads(json.dumps(values))  # Tuples as lists, as read back from the file.


def write_config(config: TrainConfig, tasks: list[Task], path: str) -> None:
    """Writes the resolved configuration (trainer and every task) as JSON, atomically.

    Raises:
      MtssError: if the file cannot be written (read-only directory, disk full, ...).
    """
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(resolved(config, tasks), f, indent=2, sort_keys=True)

    try:
        write_atomically(path, write)
    except OSError as e:
        raise MtssError(f"cannot write {path}: {e.strerror or e}") from None


# Trainer settings that change which variables exist or their shapes.
_SHAPE_SETTINGS = ("tasks", "trunk_size", "lasso", "optimizer", "optimizer_state", "balance")


def changed_settings(path: str, config: TrainConfig, tasks: list[Task]) -> list[str]:
    """Settings that shape variables and differ from the flags.json at `path`, as
    '--task_param rp.head_width=256 (was 512)'; [] if the file is missing or unreadable."""
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return []
    now = resolved(config, tasks)
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}  # Of settings added later.
    changed = [f"--{key}={now[key]} (was {before.get(key, defaults[key])})" for key in _SHAPE_SETTINGS
               if now[key] != before.get(key, defaults[key])]
    for task, settings in now["task_configs"].items():
        old = before.get("task_configs", {}).get(task, {})
        changed += [f"--task_param {task}.{key}={value} (was {old[key]})" for key, value in settings.items()
                    if key in old and old[key] != value and key not in ("data", "eval_data")]
    return changed


__all__ = ["SETTING_GROUPS", "SMOKE_SETTINGS", "TrainConfig", "TaskConfig", "build_tasks", "changed_settings",
           "setting", "write_config"]
