"""The self-supervised task interface: one module per task, the trainer knows nothing else.

A task makes its own training batches from raw images (`make_dataset`), says what the shared
trunk sees (`trunk_images`), builds its head over block3 (`head`, slim code, variables under
`<name>_head/`), and scores it (`loss`). Its settings are a dataclass `Config` whose fields
are the task's defaults; users override them with `--task_param name.field=value`.

    @register_task
    class MyTask(Task):
        name = "my_task"

        @dataclasses.dataclass
        class Config(TaskConfig):
            crop: int = 64
        ...

Tasks outside this package load by import path (`--tasks my_pkg.my_mod:MyTask`) or as an
installed entry point in the group `mtss_train.tasks`.
"""

import abc
import dataclasses
from typing import Any, ClassVar

from mtss_train.compat import tf
from mtss_train.errors import MtssError
from mtss_train.registry import Registry, load_by_path, load_entry_points

Batch = dict[str, tf.Tensor]


@dataclasses.dataclass
class TaskConfig:
    """Settings every task has."""

    batch_size: int = 16  # Global examples per step of this task.
    loss_weight: float = 1.0

    def validate(self) -> None:
        if self.batch_size < 1:
            raise MtssError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loss_weight <= 0:
            raise MtssError(f"loss_weight must be > 0, got {self.loss_weight}")


class Task(abc.ABC):
    """A self-supervised task over the shared trunk."""

    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, config: TaskConfig):
        config.validate()
        self.config = config

    @property
    def head_scope(self) -> str:
        """Variable scope of the head: its checkpoint keys start with it."""
        return f"{self.name}_head"

    @abc.abstractmethod
    def make_dataset(self, images: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        """Batches of this task's examples.

        Args:
          images: endless, shuffled decoded RGB uint8 images [H, W, 3] of varying size.
          batch_size: examples per batch (per replica).
          seed: for the task's random choices.

        Returns:
          A dataset of Batch dicts with static batch size.
        """

    @abc.abstractmethod
    def trunk_images(self, batch: Batch) -> tf.Tensor:
        """The [M, H, W, 3] VGG-preprocessed images the trunk sees for this batch."""

    @abc.abstractmethod
    def head(self, block3: tf.Tensor, batch: Batch, is_training: bool) -> dict[str, tf.Tensor]:
        """slim head over block3 features [M, h, w, C]; runs inside the task's arg_scope."""

    @abc.abstractmethod
    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """(per-example loss [N], metrics name -> per-example values [N])."""

    def image_summaries(self, batch: Batch, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Images for TensorBoard: name -> [K, H, W, 3] floats in [0, 1]. None by default."""
        return {}


TASKS: Registry[type[Task]] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: registers a Task subclass under its `name`."""
    return TASKS.register(cls.name)(cls)


def task_class(spec: str) -> type[Task]:
    """A registered task name, or `module.path:ClassName` of a Task subclass."""
    if ":" in spec:
        cls = load_by_path(spec)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise MtssError(f"{spec!r} is not a subclass of mtss_train.task.Task")
        return cls
    import mtss_train.tasks  # noqa: F401  Registers the built-in tasks.

    if spec not in TASKS.names():
        load_entry_points(TASKS)
    return TASKS.get(spec)


def make_config(cls: type[Task], overrides: dict[str, str]) -> TaskConfig:
    """The task's Config with `field=value` string overrides converted to the field types."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    values: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in fields:
            raise MtssError(
                f"task {cls.name!r} has no setting {key!r}; settings: {', '.join(sorted(fields))}"
            )
        values[key] = _parse(text, cls.Config.__dataclass_fields__[key].type, f"{cls.name}.{key}")
    return cls.Config(**values)


def _parse(text: str, annotation: Any, where: str) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(
        getattr(annotation, "__name__", str(annotation)), None
    )
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise MtssError(f"{where} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text) if kind else text
    except ValueError:
        raise MtssError(f"{where} takes type {kind.__name__}, got {text!r}") from None
