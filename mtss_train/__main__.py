"""Trains the multi-task network: `python -m mtss_train --tasks rp,col,ex,ms --train_dir DIR`.

With no --data it trains on the photos bundled with scikit-image. --smoke makes a run small
enough for a laptop CPU (tiny trunk, 200 steps); drop it for the full-scale settings.
"""

import os
import signal
import sys

INTERRUPTED_AT_START = "error: interrupted (Ctrl-C) while starting; nothing was saved"


def _interrupted_while_importing(signum: int, frame: object) -> None:
    print(INTERRUPTED_AT_START, file=sys.stderr, flush=True)
    os._exit(128 + signum)  # Nothing to clean up yet; an import cannot be unwound cleanly.


if __name__ == "__main__":
    # Ctrl-C while TensorFlow loads (seconds) ends with one line and 130, not an import
    # traceback; `run` hands SIGINT back to Python (KeyboardInterrupt) once imports are done.
    signal.signal(signal.SIGINT, _interrupted_while_importing)

from mtss_train import startup  # noqa: F401, E402  First: quiets TensorFlow's start-up logs.

import dataclasses  # noqa: E402
import shutil  # noqa: E402

from absl import app, flags  # noqa: E402

from mtss_train.model import trunk  # noqa: E402
from mtss_train.compat import tf  # noqa: E402
from mtss_train.train.config import (LR_SCHEDULES, OPTIMIZERS, PRECISIONS, SCHEDULES, STRATEGIES, TrainConfig,  # noqa: E402
                               build_tasks)
from mtss_train.configs import expand_config  # noqa: E402
from mtss_train.train.distribution import serve_if_server  # noqa: E402
from mtss_train.errors import INTERRUPTED_EXIT_CODE, MtssError, cli_main, ctrl_c_wins, raise_keyboard_interrupt  # noqa: E402
from mtss_train.task import task_class  # noqa: E402
from mtss_train.train.trainer import Trainer  # noqa: E402


def _default(name: str):
    """TrainConfig's default for a setting: flags show it, the dataclass owns it."""
    field = TrainConfig.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


# Short runs need fast BN moving averages, or inference-mode outputs lag far behind.
_SMOKE_DEFAULTS = {"max_steps": 200, "trunk_size": "tiny", "save_every_steps": 100,
                   "summary_every_steps": 20, "batch_norm_decay": 0.9}
_FULL_DEFAULTS = {key: _default(key) for key in _SMOKE_DEFAULTS}


def _defaults(key: str) -> str:
    return f"default {_FULL_DEFAULTS[key]}; {_SMOKE_DEFAULTS[key]} with --smoke"


_CONFIG = flags.DEFINE_string(
    "config", None, "A shipped configuration (absl flagfile in mtss_train/configs): rp_col_ex_ms, "
    "rp_col_ex_ms_harmonized_lasso, rp, col, ex, ms. Flags given beside it override it.")
_TASKS = flags.DEFINE_list("tasks", ["rp"], "Tasks to train: registered names or module.path:Class.")
_TRAIN_DIR = flags.DEFINE_string("train_dir", "runs/mtss", "Checkpoints, flags.json and logs/ go here.")
_DATA = flags.DEFINE_string("data", None, "Image directory (recursive jpg/png) or TFRecords; default: bundled sample photos.")
_TASK_PARAM = flags.DEFINE_multi_string("task_param", [], "Task setting as task.field=value, e.g. rp.batch_size=32.")
_SCHEDULE = flags.DEFINE_enum("schedule", _default("schedule"), list(SCHEDULES), "How each step picks its task.")
_TASK_WEIGHTS = flags.DEFINE_list("task_weights", None, "Sampling weight per task (with --schedule weighted).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, f"Total steps over all tasks ({_defaults('max_steps')}).")
_SMOKE = flags.DEFINE_bool("smoke", False, f"Small CPU run: tiny trunk, {_SMOKE_DEFAULTS['max_steps']} steps, each task's small settings (e.g. batch 8), frequent logs.")
_TRUNK_SIZE = flags.DEFINE_enum("trunk_size", None, list(trunk.TRUNK_SIZES), f"Trunk ({_defaults('trunk_size')}).")
_OUTPUT_STRIDE = flags.DEFINE_enum("output_stride", None, ["8", "16", "32"], "Atrous block3 stride (default 32).")
_HARMONIZE = flags.DEFINE_bool("harmonize", _default("harmonize"), "Harmonization (paper 3.3): rp sees L only (grey), as col does.")
_LASSO = flags.DEFINE_bool("lasso", _default("lasso"), "Lasso (paper Fig. 1b): each head reads a learned sparse mix of block3's units.")
_LASSO_L1 = flags.DEFINE_float("lasso_l1", _default("lasso_l1"), "Weight of the lasso's sparsity penalty ||alpha||_1 / ||alpha||_2 on each head's per-unit weights.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", _default("optimizer"), list(OPTIMIZERS), "Optimizer.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", _default("learning_rate"), "Peak learning rate.")
_LR_SCHEDULE = flags.DEFINE_enum("lr_schedule", _default("lr_schedule"), list(LR_SCHEDULES), "Learning-rate schedule.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", _default("warmup_steps"), "Linear warm-up steps (cosine schedule).")
_MOMENTUM = flags.DEFINE_float("momentum", _default("momentum"), "Momentum (RMSProp and SGD).")
_RMSPROP_DECAY = flags.DEFINE_float("rmsprop_decay", _default("rmsprop_decay"), "RMSProp decay of the squared-gradient average.")
_RMSPROP_EPSILON = flags.DEFINE_float("rmsprop_epsilon", _default("rmsprop_epsilon"), "RMSProp epsilon (1.0 as in slim's train_image_classifier).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", _default("weight_decay"), "L2 weight decay of conv weights.")
_BATCH_NORM_DECAY = flags.DEFINE_float("batch_norm_decay", None, f"BN moving-average decay ({_defaults('batch_norm_decay')}).")
_FREEZE_BATCH_NORM = flags.DEFINE_bool("freeze_batch_norm", _default("freeze_batch_norm"), "BatchNorm (trunk and heads) uses and keeps its moving statistics; everything else trains. For fine-tuning with small per-replica batches.")
_CLIP_NORM = flags.DEFINE_float("clip_norm", _default("clip_norm"), "Clip gradients to this global norm; 0 = off.")
_INIT_CHECKPOINT = flags.DEFINE_string("init_checkpoint", None, "Warm start (e.g. the released model) when train_dir has no checkpoint.")
_EXCLUDE_SCOPES = flags.DEFINE_list("exclude_scopes", _default("exclude_scopes"), "Variable scopes never warm-started.")
_TRAINABLE_SCOPES = flags.DEFINE_list("trainable_scopes", _default("trainable_scopes"), "Train only variables under these scopes (default all).")
_SAVE_EVERY = flags.DEFINE_integer("save_every_steps", None, f"Checkpoint interval ({_defaults('save_every_steps')}).")
_KEEP = flags.DEFINE_integer("keep_checkpoints", _default("keep_checkpoints"), "Checkpoints kept.")
_SUMMARY_EVERY = flags.DEFINE_integer("summary_every_steps", None, f"TensorBoard interval ({_defaults('summary_every_steps')}).")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", _default("log_every_steps"), "Console progress interval.")
_STOP_CHECK_EVERY = flags.DEFINE_integer(
    "stop_check_every_steps", _default("stop_check_every_steps"),
    "--strategy multi_worker: how often the workers agree on SIGTERM/SIGINT (one tiny all-reduce), so all "
    "stop at the same step, the chief saves it, and each exits 128 + the signal.")
_CHIEF_GONE_SECONDS = flags.DEFINE_float(
    "chief_gone_seconds", 60, "--strategy parameter_server: a worker or parameter server leaves (exit 0) once the "
    "chief it served has not answered for this long, so the scheduler sees the job end.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", _default("seed"), "Seed of data order, task schedule and augmentation.")
_STRATEGY = flags.DEFINE_enum("strategy", _default("strategy"), list(STRATEGIES), "tf.distribute strategy.")
_PRECISION = flags.DEFINE_enum("precision", _default("precision"), list(PRECISIONS), "Compute dtype (mixed precision: bfloat16 on TPU/CPU/Ampere+, float16 with loss scaling on GPUs); weights stay float32.")
_EVAL_DATA = flags.DEFINE_string("eval_data", None, "Held-out images: evaluated after every checkpoint (eval/ summaries).")
_IMAGE_KEY = flags.DEFINE_string("image_key", _default("image_key"), "TFRecord feature holding the encoded image.")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", _default("max_image_pixels"), "Images with more pixels are skipped and counted (read from the header, before decoding).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", _default("eval_batches"), "Batches per task and evaluation.", lower_bound=1)


def parse_task_params(values: list[str]) -> dict[str, dict[str, str]]:
    params: dict[str, dict[str, str]] = {}
    for item in values:
        key, sep, value = item.partition("=")
        task, dot, field = key.rpartition(".")
        if not (sep and dot and task and field):
            raise MtssError(f"--task_param {item!r} is not task.field=value")
        params.setdefault(task, {})[field] = value
    return params


def config_from_flags() -> TrainConfig:
    defaults = _SMOKE_DEFAULTS if _SMOKE.value else _FULL_DEFAULTS
    pick = lambda flag, key: defaults[key] if flag.value is None else flag.value  # noqa: E731
    params = parse_task_params(_TASK_PARAM.value)
    if _SMOKE.value:  # Each task's small settings, under what the user set for it.
        for spec in _TASKS.value:
            cls = task_class(spec)
            given = {**params.get(cls.name, {}), **params.get(spec, {})}
            for key, value in cls.smoke_settings.items():
                if key not in given:
                    params.setdefault(cls.name, {})[key] = value
    try:
        weights = [float(w) for w in _TASK_WEIGHTS.value] if _TASK_WEIGHTS.value else None
    except ValueError:
        raise MtssError(f"--task_weights takes numbers, got {_TASK_WEIGHTS.value}") from None
    return TrainConfig(
        train_dir=_TRAIN_DIR.value, tasks=_TASKS.value, task_params=params, data=_DATA.value,
        eval_data=_EVAL_DATA.value, eval_batches=_EVAL_BATCHES.value,
        image_key=_IMAGE_KEY.value, max_image_pixels=_MAX_IMAGE_PIXELS.value,
        schedule=_SCHEDULE.value, task_weights=weights, max_steps=pick(_MAX_STEPS, "max_steps"),
        trunk_size=pick(_TRUNK_SIZE, "trunk_size"),
        output_stride=int(_OUTPUT_STRIDE.value) if _OUTPUT_STRIDE.value else None,
        harmonize=_HARMONIZE.value, lasso=_LASSO.value, lasso_l1=_LASSO_L1.value,
        optimizer=_OPTIMIZER.value, learning_rate=_LEARNING_RATE.value,
        lr_schedule=_LR_SCHEDULE.value, warmup_steps=_WARMUP_STEPS.value,
        momentum=_MOMENTUM.value, rmsprop_decay=_RMSPROP_DECAY.value,
        rmsprop_epsilon=_RMSPROP_EPSILON.value, weight_decay=_WEIGHT_DECAY.value, clip_norm=_CLIP_NORM.value,
        batch_norm_decay=pick(_BATCH_NORM_DECAY, "batch_norm_decay"), freeze_batch_norm=_FREEZE_BATCH_NORM.value,
        init_checkpoint=_INIT_CHECKPOINT.value, exclude_scopes=_EXCLUDE_SCOPES.value,
        trainable_scopes=_TRAINABLE_SCOPES.value,
        save_every_steps=pick(_SAVE_EVERY, "save_every_steps"), keep_checkpoints=_KEEP.value,
        summary_every_steps=pick(_SUMMARY_EVERY, "summary_every_steps"),
        log_every_steps=_LOG_EVERY.value, stop_check_every_steps=_STOP_CHECK_EVERY.value, seed=_SEED.value,
        strategy=_STRATEGY.value, precision=_PRECISION.value,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {argv[1:]}; everything is a --flag")
    tf.get_logger().setLevel("WARNING")  # tf.distribute logs every all-reduce at INFO.
    try:
        with ctrl_c_wins():
            config = config_from_flags()
            if _STRATEGY.value == "parameter_server":  # Its workers and ps fail on bad flags as the chief does.
                config.validate()
                build_tasks(config)
            if serve_if_server(_STRATEGY.value, _CHIEF_GONE_SECONDS.value):  # A parameter-server job's worker or ps.
                return
            trainer = Trainer(config)
            checkpoint = trainer.train()
    except MtssError as e:
        _leave(f"error: {e}", 2)
    except KeyboardInterrupt:  # Before the training loop, which handles Ctrl-C itself.
        _leave(INTERRUPTED_AT_START, INTERRUPTED_EXIT_CODE)
    if trainer.chief:
        print(describe_outputs(trainer.config.train_dir, checkpoint, trainer.summary_dir))
    if trainer.stopped_by:
        sys.exit(128 + trainer.stopped_by)  # The shell's convention for "ended by signal N".


def _leave(message: str, code: int) -> None:
    """Prints `message` and exits at once. The input pipelines may still be running
    numpy_function calls; tearing them down in interpreter shutdown can deadlock on the
    GIL (seen after an out-of-memory batch), and nothing is left to save: checkpoints are
    atomic, the lock dies with the process."""
    print(message, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def describe_outputs(train_dir: str, checkpoint: str | None, summary_dir: str) -> str:
    """Where the results are and commands to look at them that work from this shell."""
    python = _runnable(sys.executable, "python")
    tensorboard = _runnable(os.path.join(os.path.dirname(sys.executable), "tensorboard"), "tensorboard")
    return "\n".join([
        f"checkpoint:      {checkpoint}",
        f"config:          {os.path.join(train_dir, 'flags.json')}",
        f"TensorBoard:     {summary_dir}   (view: {tensorboard} --logdir {summary_dir})",
        f"inspect weights: {python} -m mtss_train.ckpt ls {train_dir}",
    ])


def _runnable(path: str, name: str) -> str:
    """`name` if the shell finds this very program by it, else its (relative if shorter) path."""
    if shutil.which(name) and os.path.realpath(shutil.which(name)) == os.path.realpath(path):
        return name
    relative = os.path.relpath(path)
    return relative if len(relative) < len(path) and not relative.startswith("..") else path


def run() -> None:
    signal.signal(signal.SIGINT, raise_keyboard_interrupt)  # Ctrl-C is KeyboardInterrupt again, and remembered.
    try:
        argv = expand_config(sys.argv)
        app.run(cli_main(main), argv=argv)
    except MtssError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # During flag parsing; `main` covers the rest.
        print(INTERRUPTED_AT_START, file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    run()
