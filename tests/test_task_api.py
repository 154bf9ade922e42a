"""The task registry, loading tasks by import path and entry point, config overrides."""

import collections
import dataclasses
import os
from typing import Optional

import pytest

from mtss_train.compat import tf_keras
from mtss_train.train.config import TrainConfig, build_tasks
from mtss_train.errors import MtssError
from mtss_train.registry import Registry
from mtss_train.task import Task, TaskConfig, make_config, task_class
from mtss_train.train.optim import FusedRMSprop, make_learning_rate, make_optimizer
from mtss_train.train.trainer import TaskSchedule

TESTS = os.path.dirname(__file__)


@pytest.fixture
def plugin_path(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(MtssError, match=r"unknown task 'jigsaw'; known: .*rp"):
        task_class("jigsaw")


def test_task_by_import_path(plugin_path):
    cls = task_class("plugin_rotation:Rotation")
    assert issubclass(cls, Task) and cls.name == "rotation"


@pytest.mark.parametrize(
    "spec, fragment",
    [("no_such_module:Task", "cannot import 'no_such_module'"),
     ("plugin_rotation:Missing", "has no attribute 'Missing'"),
     ("plugin_rotation:dataclasses", "not a subclass of mtss_train.task.Task")],
)
def test_bad_import_paths(plugin_path, spec, fragment):
    with pytest.raises(MtssError, match=fragment):
        task_class(spec)


def install_plugin(site, monkeypatch, entry_point: str) -> None:
    """Makes `site` look like site-packages holding a distribution with one task entry point."""
    dist = site / "mtss_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mtss-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[mtss_train.tasks]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(site))


def test_installed_entry_point_registers_a_task(tmp_path, monkeypatch, plugin_path):
    install_plugin(tmp_path, monkeypatch, "rotation = plugin_rotation:Rotation")
    assert task_class("rotation").__name__ == "Rotation"


def test_a_broken_plugin_names_itself_and_breaks_only_runs_that_use_it(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken = no_such_plugin_module:Task")
    with pytest.raises(MtssError, match="plugin 'broken' = 'no_such_plugin_module:Task' failed to load"):
        task_class("broken")
    assert task_class("rp").__name__ == "RelativePosition"  # Built-ins load by their own entry points.
    with pytest.raises(MtssError, match="unknown task 'nope'; known: ") as unknown:
        task_class("nope")
    assert {"broken", "col", "ex", "ms", "rp"} <= set(str(unknown.value).split("known: ")[1].split(" (")[0].split(", "))


def test_registry_refuses_a_second_definition_under_one_name():
    registry = Registry("thing")
    registry.register("a")(TaskSchedule)
    registry.register("a")(TaskSchedule)  # The same object again (e.g. a re-import) is fine.
    with pytest.raises(ValueError, match="'a' is already registered by .*trainer.py"):
        registry.register("a")(Registry)


def test_config_overrides_are_typed(plugin_path):
    cls = task_class("plugin_rotation:Rotation")
    config = make_config(cls, {"crop_size": "32", "loss_weight": "0.5"})
    assert (config.crop_size, config.loss_weight, config.batch_size) == (32, 0.5, 16)
    with pytest.raises(MtssError, match="rotation.crop_size takes type int, got 'big'"):
        make_config(cls, {"crop_size": "big"})
    with pytest.raises(MtssError, match="has no setting 'crop'; settings: batch_size, crop_size, data, eval_data, loss_weight, output_stride"):
        make_config(cls, {"crop": "3"})


class TypedTask(Task):
    """Settings of every form --task_param parses."""

    name = "typed"

    @dataclasses.dataclass
    class Config(TaskConfig):
        scale: float | None = None
        maybe_size: Optional[int] = 3
        sizes: tuple[int, ...] = (1, 2)
        rates: list[float] = dataclasses.field(default_factory=list)
        names: tuple[str, ...] = ()
        flip: bool = False


@pytest.mark.parametrize(
    "field, text, value",
    [("scale", "0.5", 0.5), ("scale", "none", None), ("maybe_size", "7", 7), ("maybe_size", "None", None),
     ("sizes", "64, 32", (64, 32)), ("rates", "0.1,1e-3", [0.1, 1e-3]), ("names", "a,b", ("a", "b")),
     ("flip", "true", True), ("flip", "0", False), ("output_stride", "16", 16), ("data", "/x", "/x")],
)
def test_task_params_parse_optional_tuple_list_and_bool_fields(field, text, value):
    assert getattr(make_config(TypedTask, {field: text}), field) == value


@pytest.mark.parametrize(
    "field, text, fragment",
    [("sizes", "64,big", "typed.sizes takes comma-separated values"), ("flip", "yes", "takes true or false"),
     ("maybe_size", "3.5", "typed.maybe_size takes"), ("output_stride", "12", "output_stride must be 8, 16, 32")],
)
def test_bad_task_param_values_name_the_setting(field, text, fragment):
    with pytest.raises(MtssError, match=fragment):
        TypedTask.Config.validate(make_config(TypedTask, {field: text}))


def test_a_setting_task_param_cannot_express_is_refused_when_the_task_loads():
    class DictTask(TypedTask):
        name = "dict_task"

        @dataclasses.dataclass
        class Config(TaskConfig):
            table: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(MtssError, match="'dict_task' setting 'table' has type dict.* --task_param cannot set"):
        make_config(DictTask, {})


def test_task_params_reach_the_right_task(plugin_path):
    config = TrainConfig(
        train_dir="unused", tasks=["rp", "plugin_rotation:Rotation"],
        task_params={"rp": {"batch_size": "4"}, "rotation": {"crop_size": "48"}},
    )
    config.validate()
    rp, rotation = build_tasks(config)
    assert (rp.config.batch_size, rotation.config.crop_size, rotation.config.batch_size) == (4, 48, 16)
    assert dataclasses.asdict(rp.config)["patch_size"] == 96


def test_round_robin_schedule():
    schedule = TaskSchedule(["rp", "col", "ex"], "round_robin", None, seed=0)
    assert [schedule.tasks_at(s) for s in range(4)] == [["rp"], ["col"], ["ex"], ["rp"]]


def test_all_tasks_schedule_trains_every_task_each_step():
    schedule = TaskSchedule(["rp", "col", "ex"], "all", None, seed=0)
    assert [schedule.tasks_at(s) for s in range(2)] == [["rp", "col", "ex"]] * 2


def test_weighted_schedule_follows_the_weights_and_the_seed():
    schedule = TaskSchedule(["rp", "col"], "weighted", [3.0, 1.0], seed=1)
    picks = [schedule.tasks_at(s)[0] for s in range(4000)]
    assert 0.72 < collections.Counter(picks)["rp"] / len(picks) < 0.78
    assert picks == [TaskSchedule(["rp", "col"], "weighted", [3.0, 1.0], seed=1).tasks_at(s)[0] for s in range(4000)]
    assert picks != [TaskSchedule(["rp", "col"], "weighted", [3.0, 1.0], seed=2).tasks_at(s)[0] for s in range(4000)]


@pytest.mark.parametrize(
    "schedule, rates",
    [("constant", {0: 0.1, 50: 0.1, 100: 0.1}),
     ("step", {0: 0.1, 50: 0.1, 51: 0.01, 76: 0.001}),
     ("cosine", {0: 0.0, 10: 0.1, 55: 0.05, 100: 0.0})],
)
def test_learning_rate_schedules(schedule, rates):
    config = TrainConfig(train_dir="unused", tasks=["rp"], learning_rate=0.1, lr_schedule=schedule,
                         warmup_steps=10 if schedule == "cosine" else 0, max_steps=100)
    rate = make_learning_rate(config)
    for step, expected in rates.items():
        assert float(rate(step) if callable(rate) else rate) == pytest.approx(expected, abs=1e-6), step


def test_optimizers_and_clipping():
    rmsprop = make_optimizer(TrainConfig(train_dir="unused", tasks=["rp"], clip_norm=5.0))
    # tf_keras's RMSprop, updating dense gradients with TF1's fused kernel as slim does.
    assert type(rmsprop) is FusedRMSprop and isinstance(rmsprop, tf_keras.optimizers.RMSprop)
    assert rmsprop.name == "RMSprop" and rmsprop.global_clipnorm == 5.0
    assert rmsprop.epsilon == 1.0 and rmsprop.rho == 0.9 and rmsprop.momentum == 0.9
    sgd = make_optimizer(TrainConfig(train_dir="unused", tasks=["rp"], optimizer="momentum", momentum=0.5))
    assert type(sgd).__name__ == "SGD" and sgd.momentum == 0.5 and sgd.global_clipnorm is None
