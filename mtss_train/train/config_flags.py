"""TrainConfig as the flags of `python -m mtss_train`, declared nowhere but in TrainConfig.

Each field declared with `config.setting` becomes one absl flag, typed by the field's type,
with its default and help text, an enum of its `choices`, and its `lower_bound`, listed by
--helpfull under the heading of its group ("mtss_train: data", ...); the parsed flags are
read back into a TrainConfig. Two flags are written out here because they are no
field of their own: --task_param (task.field=value, collected into `task_params`) and
--smoke (SMOKE_SETTINGS and each task's `smoke_settings`, where the user set nothing).

    SETTINGS = TrainConfigFlags()  # Beside the program's other flags, before absl parses them.
    ...
    config = SETTINGS.config()     # In main.
"""

import dataclasses
import types
import typing
from typing import Any, Callable

from absl import flags

from mtss_train.errors import MtssError
from mtss_train.task import task_class
from mtss_train.train.config import SMOKE_SETTINGS, TrainConfig, check_group

# absl lists flags under the module that defines them; ours are defined under the heading
# of their topic instead and declared key flags of the program that asks for them (this
# module disclaims them), so its --help lists them too.
flags.disclaim_key_flags()

_SCALAR_FLAGS = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                 bool: flags.DEFINE_bool}
_LIST_ELEMENTS = {str: "text", int: "integers", float: "numbers"}  # What a list flag's error says it takes.


def heading(group: str) -> str:
    """The --helpfull heading of the flags of `group` (one of config.SETTING_GROUPS): pass it
    as `module_name` to a flag definition, and declare the flag key to the program.

    Raises:
      ValueError: if `group` is none of SETTING_GROUPS.
    """
    return f"mtss_train: {check_group(group)}"


class TrainConfigFlags:
    """Defines the flags of a TrainConfig class on construction; `config()` reads them back.

    Flag types follow the field types: str, int, float, bool, a list of str, int or float
    (comma-separated), or an optional one of these (default None); a field with `choices`
    is an enum flag of them. Each flag is listed under its field's group (`heading`) and is a
    key flag of the module that constructs this. A field in SMOKE_SETTINGS has the default
    None, "not given", which --smoke or TrainConfig's default then fills; its help says both
    values.
    """

    def __init__(self, config_class: type[TrainConfig] = TrainConfig, flag_values: flags.FlagValues = flags.FLAGS):
        """Defines the flags in `flag_values`.

        Raises:
          TypeError: if a field was declared without `setting` (no help text or group) or has a
            type no flag takes.
        """
        self._config_class = config_class
        self._flag_values = flag_values
        hints = typing.get_type_hints(config_class)
        fields = [f for f in dataclasses.fields(config_class) if f.init and f.name != "task_params"]
        unknown = set(SMOKE_SETTINGS) - {f.name for f in fields}
        if unknown:
            raise TypeError(f"SMOKE_SETTINGS names no field of {config_class.__name__}: {sorted(unknown)}")
        self._readers = {f.name: _define(f, hints[f.name], flag_values) for f in fields}
        self._task_param = flags.DEFINE_multi_string(
            "task_param", [], "Task setting as task.field=value, e.g. rp.batch_size=32.", flag_values=flag_values,
            module_name=heading("tasks and schedule"))
        self._smoke = flags.DEFINE_bool(
            "smoke", False, f"Small CPU run: {SMOKE_SETTINGS['trunk_size']} trunk, {SMOKE_SETTINGS['max_steps']} "
            "steps, each task's small settings (e.g. batch 8), frequent logs.", flag_values=flag_values,
            module_name=heading("run"))
        for name in [*self._readers, "task_param", "smoke"]:
            flags.declare_key_flag(name, flag_values)

    def config(self) -> TrainConfig:
        """The configuration the parsed flags describe (not validated yet).

        Raises:
          MtssError: a --task_param that is not task.field=value, a list flag whose items
            do not parse, or (with --smoke) an unknown task.
        """
        values = {}
        for name, read in self._readers.items():
            value = self._flag_values[name].value
            if value is None and name in SMOKE_SETTINGS:  # Not given: --smoke's value, or TrainConfig's default.
                if self._smoke.value:
                    values[name] = SMOKE_SETTINGS[name]
                continue
            values[name] = read(value)
        params = _task_params(self._task_param.value)
        if self._smoke.value:  # Each task's small settings, under what the user set for it.
            for spec in values["tasks"]:
                cls = task_class(spec)
                given = {**params.get(cls.name, {}), **params.get(spec, {})}
                for key, value in cls.smoke_settings.items():
                    if key not in given:
                        params.setdefault(cls.name, {})[key] = value
        return self._config_class(task_params=params, **values)


def _define(field: dataclasses.Field, hint: Any, flag_values: flags.FlagValues) -> Callable[[Any], Any]:
    """Defines the flag of `field`, of type `hint`; returns what turns the flag's parsed
    value into the field's."""
    for key, what in (("help", "help text"), ("group", "group")):
        if key not in field.metadata:
            raise TypeError(f"field {field.name} has no {what}: declare it with mtss_train.train.config.setting")
    name, help_text, choices = field.name, field.metadata["help"], field.metadata["choices"]
    where = {"flag_values": flag_values, "module_name": heading(field.metadata["group"])}
    default = _flag_default(field)
    if field.name in SMOKE_SETTINGS:
        help_text = (f"{help_text.rstrip('.')} (default {_field_default(field)}; "
                     f"{SMOKE_SETTINGS[field.name]} with --smoke).")
    kind = _without_none(hint)
    if choices:  # absl's enums are of text: --output_stride 16 is the int 16.
        by_text = {str(choice): choice for choice in choices}
        flags.DEFINE_enum(name, None if default is None else str(default), list(by_text), help_text, **where)
        return lambda text: None if text is None else by_text[text]
    if kind in _SCALAR_FLAGS:
        bound = {} if field.metadata["lower_bound"] is None else {"lower_bound": field.metadata["lower_bound"]}
        _SCALAR_FLAGS[kind](name, default, help_text, **where, **bound)
        return lambda value: value
    element = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
    if element in _LIST_ELEMENTS:
        flags.DEFINE_list(name, default, help_text, **where)
        return lambda texts: None if texts is None else _list_of(element, texts, name)
    raise TypeError(f"field {name} has type {hint}, which no flag takes; use str, int, float, bool, a list of "
                    "str, int or float, or an optional one of these")


def _without_none(hint: Any) -> Any:
    """`X` for `X | None` (and `Optional[X]`), else `hint`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def _field_default(field: dataclasses.Field) -> Any:
    """TrainConfig's default for `field`; MISSING if it has none."""
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def _flag_default(field: dataclasses.Field) -> Any:
    """The flag's default: None for "not given" in SMOKE_SETTINGS, the command line's own
    for a field TrainConfig requires, else TrainConfig's."""
    if field.name in SMOKE_SETTINGS:
        return None
    default = field.metadata["flag_default"]
    if default is dataclasses.MISSING:
        default = _field_default(field)
    if default is dataclasses.MISSING:
        raise TypeError(f"field {field.name} has no default: give setting() a flag_default")
    return default


def _list_of(element: type, texts: list[str], name: str) -> list:
    try:
        return [element(text) for text in texts]
    except ValueError:
        raise MtssError(f"--{name} takes {_LIST_ELEMENTS[element]}, got {texts}") from None


def _task_params(items: list[str]) -> dict[str, dict[str, str]]:
    """{task: {field: value}} of --task_param task.field=value items."""
    params: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, field = key.rpartition(".")
        if not (sep and dot and task and field):
            raise MtssError(f"--task_param {item!r} is not task.field=value")
        params.setdefault(task, {})[field] = value
    return params
