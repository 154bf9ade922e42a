"""The resolved training configuration: every default in one place, validated once."""

import dataclasses
import json
import math
import os

from mtss_train.model import trunk
from mtss_train.data.images import DEFAULT_MAX_PIXELS, TFRECORD_IMAGE_KEY
from mtss_train.errors import MtssError
from mtss_train.task import Task, TaskConfig, make_config, task_class

CONFIG_VERSION = 1
OPTIMIZERS = ("rmsprop", "momentum")
LR_SCHEDULES = ("constant", "cosine", "step")
# Each step trains one task (in turn, or drawn by --task_weights), or all of them on the
# sum of their weighted losses.
SCHEDULES = ("round_robin", "weighted", "all")
STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server")
# Compute dtype of the network; variables, optimizer state and checkpoints stay float32.
PRECISIONS = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class TrainConfig:
    """Trainer settings; task settings live in each task's Config."""

    train_dir: str
    tasks: list[str]
    task_params: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    data: str | None = None  # Shared images; None: the embedded sample photos.
    eval_data: str | None = None  # Held-out shared images, evaluated after every checkpoint.
    eval_batches: int = 10  # Batches per task and evaluation.
    image_key: str = TFRECORD_IMAGE_KEY  # TFRecord feature holding the encoded image.
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # Larger images are skipped (header read only).
    schedule: str = "round_robin"
    task_weights: list[float] | None = None
    max_steps: int = 200_000
    trunk_size: str = "101"
    output_stride: int | None = None
    harmonize: bool = False  # Tasks with harmonize_to_grey (rp) see L only, as col does.
    lasso: bool = False  # Each head reads a sparsity-penalised mix of block3's unit outputs.
    lasso_l1: float = 0.3  # Weight of the lasso's sparsity penalty (mtss_train.model.lasso); ours, see README.
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    momentum: float = 0.9
    rmsprop_decay: float = 0.9
    rmsprop_epsilon: float = 1.0
    weight_decay: float = 1e-4
    batch_norm_decay: float = 0.997
    # BatchNorm normalises with its moving statistics and leaves them as they are (for
    # fine-tuning on small per-replica batches, whose batch statistics are noisy).
    freeze_batch_norm: bool = False
    clip_norm: float = 0.0  # Global-norm gradient clipping; 0 disables it.
    init_checkpoint: str | None = None
    exclude_scopes: list[str] = dataclasses.field(default_factory=lambda: list(trunk.NOT_IN_TRUNK))
    trainable_scopes: list[str] = dataclasses.field(default_factory=list)
    save_every_steps: int = 1000
    keep_checkpoints: int = 5
    summary_every_steps: int = 100
    log_every_steps: int = 10
    # Multi-worker jobs: how often the workers agree on whether a signal asked them to stop.
    stop_check_every_steps: int = 10
    seed: int = 0
    strategy: str = "default"
    precision: str = "float32"
    version: int = CONFIG_VERSION

    def validate(self) -> None:
        """Raises MtssError naming the first bad setting."""
        for field in dataclasses.fields(self):
            values = getattr(self, field.name)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, float) and not math.isfinite(value):
                    raise MtssError(f"--{field.name} must be finite, got {values}")
        checks = [
            (bool(self.tasks), "--tasks is empty"),
            (len(set(self.tasks)) == len(self.tasks), f"--tasks repeats a task: {self.tasks}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr_schedule must be one of {LR_SCHEDULES}"),
            (self.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
            (self.trunk_size in trunk.TRUNK_SIZES, f"--trunk_size must be one of {trunk.TRUNK_SIZES}"),
            (self.output_stride in (None, 8, 16, 32), "--output_stride must be 8, 16 or 32"),
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
            (self.max_image_pixels >= 1, "--max_image_pixels must be >= 1"),
            (bool(self.image_key), "--image_key must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise MtssError(message)
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
    values["task_configs"] = {t.name: dataclasses.asdict(t.config) for t in tasks}
    return json.loads(json.dumps(values))  # Tuples as lists, as read back from the file.


def write_config(config: TrainConfig, tasks: list[Task], path: str) -> None:
    """Writes the resolved configuration (trainer and every task) as JSON, atomically.

    Raises:
      MtssError: if the file cannot be written (read-only directory, disk full, ...).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(resolved(config, tasks), f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise MtssError(f"cannot write {path}: {e.strerror or e}") from None


# Trainer settings that change which variables exist or their shapes.
_SHAPE_SETTINGS = ("tasks", "trunk_size", "lasso", "optimizer")


def changed_settings(path: str, config: TrainConfig, tasks: list[Task]) -> list[str]:
    """Settings that shape variables and differ from the flags.json at `path`, as
    '--task_param rp.head_width=256 (was 512)'; [] if the file is missing or unreadable."""
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return []
    now = resolved(config, tasks)
    changed = [f"--{key}={now[key]} (was {before.get(key)})" for key in _SHAPE_SETTINGS if now[key] != before.get(key)]
    for task, settings in now["task_configs"].items():
        old = before.get("task_configs", {}).get(task, {})
        changed += [f"--task_param {task}.{key}={value} (was {old[key]})" for key, value in settings.items()
                    if key in old and old[key] != value and key not in ("data", "eval_data")]
    return changed


__all__ = ["TrainConfig", "TaskConfig", "build_tasks", "changed_settings", "write_config"]
