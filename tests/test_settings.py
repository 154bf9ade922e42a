"""Each training setting is declared once, as a TrainConfig field; `python -m mtss_train`'s
flags are made from the fields and read back into the same TrainConfig."""

import dataclasses
import re

import pytest
from absl import flags

from conftest import run_cli
from mtss_train.configs import expand_config
from mtss_train.errors import MtssError
from mtss_train.task import task_class
from mtss_train.train.config import SETTING_GROUPS, TrainConfig, setting
from mtss_train.train.config_flags import TrainConfigFlags, heading


def parse(*argv: str, config_class: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The TrainConfig a command line gives, flags defined afresh (--config as the program has it)."""
    flag_values = flags.FlagValues()
    flags.DEFINE_string("config", None, "A shipped configuration.", flag_values=flag_values)
    settings = TrainConfigFlags(config_class, flag_values)
    flag_values(expand_config(["mtss_train", *argv]))
    return settings.config()


def smoke_params(*tasks: str) -> dict[str, dict[str, str]]:
    return {name: dict(task_class(name).smoke_settings) for name in tasks}


def test_a_field_added_to_the_config_is_a_flag_with_its_type_default_and_help():
    extended = dataclasses.make_dataclass("Extended", [
        ("crop_jitter", float, setting(0.25, group="data", help="Jitter of the crops.")),
        ("views", int, setting(2, group="data", help="Views per image.", lower_bound=1)),
        ("palette", str, setting("lab", group="data", help="Colour space.", choices=("lab", "rgb"))),
        ("ratios", list[float] | None, setting(None, group="data", help="Aspect ratios.")),
    ], bases=(TrainConfig,))
    flag_values = flags.FlagValues()
    TrainConfigFlags(extended, flag_values)
    expected = {"crop_jitter": ("float", 0.25, "Jitter of the crops."), "views": ("int", 2, "Views per image."),
                "palette": ("string enum", "lab", "<lab|rgb>: Colour space."),
                "ratios": ("comma separated list of strings", None, "Aspect ratios.")}
    for name, (kind, default, help_text) in expected.items():
        flag = flag_values[name]
        assert (flag.flag_type(), flag.default, flag.help) == (kind, default, help_text), name
    assert flag_values["views"].parser.lower_bound == 1

    config = parse("--crop_jitter", "0.5", "--palette", "rgb", "--ratios", "0.5,2", config_class=extended)
    assert isinstance(config, extended)
    assert (config.crop_jitter, config.views, config.palette, config.ratios) == (0.5, 2, "rgb", [0.5, 2.0])
    with pytest.raises(flags.IllegalFlagValueError):
        parse("--views", "0", config_class=extended)


def test_every_trainconfig_setting_is_a_flag_and_nothing_else_is():
    flag_values = flags.FlagValues()
    TrainConfigFlags(TrainConfig, flag_values)
    settings = {f.name for f in dataclasses.fields(TrainConfig) if f.init} - {"task_params"}
    assert set(flag_values) == settings | {"task_param", "smoke"}
    for name in settings:
        assert TrainConfig.__dataclass_fields__[name].metadata["help"].rstrip(".") in flag_values[name].help, name


def test_smoke_settings_say_both_defaults_in_their_help():
    flag_values = flags.FlagValues()
    TrainConfigFlags(TrainConfig, flag_values)
    assert flag_values["max_steps"].help == "Total steps over all tasks (default 200000; 200 with --smoke)."
    assert flag_values["trunk_size"].help == "<101|tiny>: Trunk (default 101; tiny with --smoke)."
    assert flag_values["max_steps"].default is None  # "Not given": --smoke or TrainConfig decides.


@pytest.mark.parametrize("argv, expected", [
    ([], TrainConfig(train_dir="runs/mtss", tasks=["rp"])),
    (["--smoke"], TrainConfig(
        train_dir="runs/mtss", tasks=["rp"], task_params=smoke_params("rp"), max_steps=200, trunk_size="tiny",
        save_every_steps=100, summary_every_steps=20, batch_norm_decay=0.9)),
    (["--smoke", "--max_steps", "7", "--tasks", "rp,col", "--task_param", "rp.batch_size=2"], TrainConfig(
        train_dir="runs/mtss", tasks=["rp", "col"], max_steps=7, trunk_size="tiny", save_every_steps=100,
        summary_every_steps=20, batch_norm_decay=0.9,
        task_params={**smoke_params("rp", "col"), "rp": {**smoke_params("rp")["rp"], "batch_size": "2"}})),
    (["--config", "rp_col_ex_ms"], TrainConfig(
        train_dir="runs/mtss", tasks=["rp", "col", "ex", "ms"], schedule="round_robin", optimizer="rmsprop",
        optimizer_state="per_task")),
    (["--config=rp_col_ex_ms_harmonized_lasso", "--lasso_l1", "0.5", "--output_stride", "16", "--nolasso"],
     TrainConfig(train_dir="runs/mtss", tasks=["rp", "col", "ex", "ms"], harmonize=True, lasso_l1=0.5,
                 output_stride=16)),
    (["--tasks", "rp,ms", "--schedule", "weighted", "--task_weights", "1,2.5", "--data", "/x", "--eval_data", "/y",
      "--init_checkpoint", "/c", "--exclude_scopes", "a,b", "--trainable_scopes", "rp_head", "--freeze_batch_norm",
      "--learning_rate", "0.1", "--strategy", "mirrored", "--precision", "bfloat16", "--seed", "3",
      "--eval_batches", "2", "--image_key", "img", "--max_image_pixels", "9", "--optimizer", "momentum",
      "--lr_schedule", "cosine", "--warmup_steps", "5", "--train_dir", "/t", "--task_param", "ms.batch_size=3"],
     TrainConfig(train_dir="/t", tasks=["rp", "ms"], task_params={"ms": {"batch_size": "3"}}, schedule="weighted",
                 task_weights=[1.0, 2.5], data="/x", eval_data="/y", init_checkpoint="/c", exclude_scopes=["a", "b"],
                 trainable_scopes=["rp_head"], freeze_batch_norm=True, learning_rate=0.1, strategy="mirrored",
                 precision="bfloat16", seed=3, eval_batches=2, image_key="img", max_image_pixels=9,
                 optimizer="momentum", lr_schedule="cosine", warmup_steps=5)),
], ids=["defaults", "smoke", "smoke_under_flags", "config", "config_under_flags", "every_kind"])
def test_command_lines_give_the_config_they_gave_before(argv, expected):
    config = parse(*argv)
    assert config == expected
    assert {k: type(v) for k, v in vars(config).items()} == {k: type(v) for k, v in vars(expected).items()}


@pytest.mark.parametrize("argv, message", [
    (["--task_weights", "1,x"], "--task_weights takes numbers, got ['1', 'x']"),
    (["--task_param", "rp_batch_size=4"], "--task_param 'rp_batch_size=4' is not task.field=value"),
    (["--smoke", "--tasks", "jigsaw"], "unknown task 'jigsaw'"),
])
def test_flag_values_that_make_no_config_are_one_mtss_error(argv, message):
    with pytest.raises(MtssError, match=re.escape(message)):
        parse(*argv)


@pytest.mark.parametrize("field, message", [
    (("table", dict[str, int], setting(default_factory=dict, group="data", help="A table.")),
     "table has type .* no flag takes"),
    (("bare", int, dataclasses.field(default=1)), "bare has no help text"),
    (("needed", int, setting(group="run", help="Required.")), "needed has no default"),
])
def test_a_field_no_flag_can_express_is_refused_when_the_flags_are_made(field, message):
    broken = dataclasses.make_dataclass("Broken", [field], bases=(TrainConfig,), kw_only=True)
    with pytest.raises(TypeError, match=message):
        TrainConfigFlags(broken, flags.FlagValues())


@pytest.mark.parametrize("setting_name, value, ok", [
    ("schedule", "random", False), ("trunk_size", "50", False), ("output_stride", 12, False),
    ("output_stride", None, True), ("output_stride", 8, True), ("precision", "bfloat16", True)])
def test_validate_takes_the_choices_from_the_declaration(setting_name, value, ok):
    config = TrainConfig(train_dir="runs/x", tasks=["rp"], **{setting_name: value})
    if ok:
        config.validate()
    else:
        with pytest.raises(MtssError, match=f"--{setting_name} must be one of"):
            config.validate()


@pytest.mark.slow  # Starts the program in its own process.
def test_the_program_lists_the_generated_flags_in_its_help():
    help_text = run_cli("mtss_train", "--help").stdout
    assert "--max_steps: Total steps over all tasks (default 200000; 200 with --smoke)." in help_text
    assert "--task_param: Task setting as task.field=value" in help_text and "--[no]smoke:" in help_text


@pytest.mark.slow  # Starts the program in its own process.
def test_helpfull_lists_every_setting_under_the_heading_of_its_topic():
    listed: dict[str, list[str]] = {}  # flag -> the headings it is listed under
    section = None
    for line in run_cli("mtss_train", "--helpfull").stdout.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            section = line[:-1]
        elif match := re.match(r"  --(?:\[no\])?(\w+):", line):
            listed.setdefault(match.group(1), []).append(section)
    topics = {f.name: f.metadata["group"] for f in dataclasses.fields(TrainConfig) if "group" in f.metadata}
    topics.update(task_param="tasks and schedule", smoke="run", config="run", chief_gone_seconds="distribution",
                  workers_gone_seconds="distribution")  # The flags that are no field.
    assert {name: listed.get(name) for name in topics} == {name: [heading(g)] for name, g in topics.items()}
    ours = {name for name, sections in listed.items() if any(s.startswith("mtss_train") for s in sections)}
    assert ours == set(topics)  # Nothing else under our headings.
    assert {section for name in ours for section in listed[name]} == {heading(g) for g in SETTING_GROUPS}
    flag_values = flags.FlagValues()  # And each is a key flag of the program, so --help lists it.
    TrainConfigFlags(TrainConfig, flag_values)
    assert {flag.name for flag in flag_values.get_key_flags_for_module(__name__)} == set(flag_values)


def flags_of_a_field_without_group() -> TrainConfigFlags:
    """A field with everything `setting` records but its group."""
    metadata = {"help": "Help but no group.", "choices": (), "lower_bound": None, "flag_default": dataclasses.MISSING}
    unfiled = dataclasses.make_dataclass("Unfiled", [("bare", int, dataclasses.field(default=1, metadata=metadata))],
                                         bases=(TrainConfig,), kw_only=True)
    return TrainConfigFlags(unfiled, flags.FlagValues())


@pytest.mark.parametrize("declare, error, message", [
    (lambda: setting(1, help="Unfiled."), TypeError, "required keyword-only argument: 'group'"),
    (lambda: setting(1, group="misc", help="Misfiled."), ValueError, "group 'misc' is none of"),
    (lambda: heading("misc"), ValueError, "group 'misc' is none of"),
    (flags_of_a_field_without_group, TypeError, "bare has no group"),
], ids=["setting_without_group", "setting_unknown_group", "flag_unknown_group", "field_without_group"])
def test_a_setting_without_a_known_topic_is_refused(declare, error, message):
    with pytest.raises(error, match=message):
        declare()
