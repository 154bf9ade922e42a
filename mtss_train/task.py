"""The self-supervised task interface: one module per task, the trainer knows nothing else.

A task opens its raw input (`open_source`: the shared photos of `--data` unless it reads its
own kind of data), makes training batches from it (`make_dataset`), says what the shared
trunk sees (`trunk_images`, RGB in [0, 255]; the model preprocesses it), builds its head over
block3 (`head`, slim code, variables under `<name>_head/`), and scores it (`loss`). Its
settings are a dataclass `Config` whose fields are the task's defaults; users override them
with `--task_param name.field=value`.

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
import types
import typing
from typing import Any, Callable, ClassVar

from mtss_train.compat import tf
from mtss_train.data.images import ReadOptions, image_source
from mtss_train.data.source import Source
from mtss_train.errors import MtssError
from mtss_train.registry import Registry, installed_names, load_by_path, load_entry_point

Batch = dict[str, tf.Tensor]
# A metric is per-example values [N], or (values [N], weights [N]) for a weighted mean
# (e.g. to leave examples without signal out of it).
Metric = tf.Tensor | tuple[tf.Tensor, tf.Tensor]
OUTPUT_STRIDES = (None, 8, 16, 32)
INPUT_COLOURS = ("rgb", "grey")
# Images with a shorter side are skipped (and counted) as too small to crop from.
MIN_IMAGE_SIDE = 32


@dataclasses.dataclass
class TaskConfig:
    """Settings every task has."""

    batch_size: int = 16  # Global examples per step of this task.
    loss_weight: float = 1.0
    # Stride of block3 for this task (8/16: atrous, same variables); None: --output_stride.
    output_stride: int | None = None
    # This task's own input; None: --data / --eval_data for tasks reading the shared
    # images, the task's embedded default otherwise.
    data: str | None = None
    eval_data: str | None = None

    def validate(self) -> None:
        """Raises MtssError naming the first bad setting. A task's Config that adds
        settings extends it and calls `super().validate()`."""
        if self.batch_size < 1:
            raise MtssError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loss_weight <= 0:
            raise MtssError(f"loss_weight must be > 0, got {self.loss_weight}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise MtssError(f"output_stride must be 8, 16, 32 or none, got {self.output_stride}")


class Task(abc.ABC):
    """A self-supervised task over the shared trunk."""

    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    # The kind of raw data the task reads. Tasks of one kind and path share one Source
    # (and its skip count); "images" is the shared photos of --data.
    source_kind: ClassVar[str] = "images"
    # What `trunk_images` holds: "rgb", or "grey" (L only, three equal channels), which
    # harmonization leaves as it is.
    input_colour: ClassVar[str] = "rgb"
    # Whether --harmonize turns this task's input grey (L only), as the paper does for
    # relative position so the trunk sees colorization's input distribution.
    harmonize_to_grey: ClassVar[bool] = False
    # Config values --harmonize sets for such a task (e.g. turning off colour augmentation
    # that grey input makes pointless); flags.json records them, and a user value that
    # contradicts one is an error.
    harmonized_settings: ClassVar[dict[str, str]] = {}
    # Config values for `--smoke` runs (a few CPU minutes), under what the user sets.
    smoke_settings: ClassVar[dict[str, str]] = {"batch_size": "8"}

    def __init__(self, config: TaskConfig):
        config.validate()
        if self.input_colour not in INPUT_COLOURS:
            raise MtssError(f"input_colour must be one of {INPUT_COLOURS}, got {self.input_colour!r}")
        self.config = config

    @property
    def head_scope(self) -> str:
        """Variable scope of the head: its checkpoint keys start with it."""
        return f"{self.name}_head"

    def open_source(self, path: str | None, options: ReadOptions = ReadOptions()) -> Source:
        """This task's raw input at `path` (None: the embedded default); the shared decoded
        photos unless overridden. Called once per distinct (source_kind, path).

        `options` (--image_key, --max_image_pixels) say how the shared photos are read; the
        trainer passes them to tasks of source_kind "images" only, so a task reading its own
        kind of data may override this as `open_source(self, path)`.

        Raises:
          DataError: if `path` is missing or holds nothing usable.
        """
        return image_source(path, MIN_IMAGE_SIDE, options)

    def check_source(self, source: Source, path: str | None) -> None:
        """Checks, once at start, that `source` (opened from `path`, perhaps by another task
        of the same kind) suits this task; raises DataError naming what is wrong."""

    @abc.abstractmethod
    def make_dataset(self, source: tf.data.Dataset, batch_size: int, seed: int) -> tf.data.Dataset:
        """Batches of this task's examples.

        Args:
          source: the task's Source dataset, this input pipeline's shard: endless and
            shuffled (for "images": decoded RGB uint8 images [H, W, 3] of varying size).
          batch_size: examples per batch (per replica).
          seed: for the task's random choices: an int, or under --strategy
            parameter_server a scalar int64 tensor each worker draws for itself (so use it
            through TF ops, e.g. stateless random ops, not as a Python int).

        Returns:
          A dataset of Batch dicts with static batch size.
        """

    @abc.abstractmethod
    def trunk_images(self, batch: Batch) -> tf.Tensor:
        """The [M, H, W, 3] float RGB images in [0, 255] the trunk sees for this batch."""

    @abc.abstractmethod
    def head(self, block3: tf.Tensor, end_points: dict[str, tf.Tensor], batch: Batch,
             is_training: bool) -> dict[str, tf.Tensor]:
        """slim head over block3 features [M, h, w, C]; runs inside the task's arg_scope.

        `end_points` are the trunk's slim end points (e.g. each block3 unit's output under
        'resnet_v2_101/block3/unit_<i>/bottleneck_v2'), for heads that read more than block3.
        """

    @abc.abstractmethod
    def loss(self, outputs: dict[str, tf.Tensor], batch: Batch) -> tuple[tf.Tensor, dict[str, Metric]]:
        """(per-example loss [N], metrics name -> Metric); no metric may be named 'loss'."""

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
    if spec not in TASKS.names():
        load_entry_point(TASKS, spec)  # The built-in tasks are entry points too.
    return TASKS.get(spec, also_known=installed_names())


def make_config(cls: type[Task], overrides: dict[str, str]) -> TaskConfig:
    """The task's Config with `field=value` string overrides converted to the field types.

    Raises:
      MtssError: an unknown field, a value that does not parse, or a field whose type
        `--task_param` cannot express (checked for every field, overridden or not).
    """
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    parsers = {}
    for name in sorted(fields):
        parsers[name] = _parser(hints[name])
        if parsers[name] is None:
            raise MtssError(
                f"task {cls.name!r} setting {name!r} has type {hints[name]} that --task_param cannot "
                "set; use bool, int, float, str, an optional of one, or a tuple/list of one"
            )
    values: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in fields:
            raise MtssError(
                f"task {cls.name!r} has no setting {key!r}; settings: {', '.join(sorted(fields))}"
            )
        try:
            values[key] = parsers[key](text)
        except ValueError:
            raise MtssError(f"{cls.name}.{key} takes {_describe(hints[key])}, got {text!r}") from None
    return cls.Config(**values)


_SCALARS: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str}


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError("not true or false")
    return text.lower() in ("true", "1")


def _parser(annotation: Any) -> Callable[[str], Any] | None:
    """A function parsing --task_param text into `annotation`'s type, or None if unsupported."""
    if annotation is bool:
        return _parse_bool
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _parser(next(a for a in args if a is not type(None)))
        if inner is None:
            return None
        return lambda text: None if text.lower() in ("none", "") else inner(text)
    homogeneous = origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis)
    element = _parser(args[0]) if homogeneous and args else None
    if element is None:
        return None
    return lambda text: origin(element(part.strip()) for part in text.split(",") if part.strip())


def _describe(annotation: Any) -> str:
    """How a --task_param value of this type is written, for error messages."""
    if annotation is bool:
        return "true or false"
    if annotation in _SCALARS:
        return f"type {annotation.__name__}"
    if typing.get_origin(annotation) in (list, tuple):
        return f"comma-separated values ({annotation})"
    return f"{annotation} ('none' for None)"
