"""Trains the multi-task network: `python -m mtss_train --tasks rp,col,ex,ms --train_dir DIR`.

With no --data it trains on the photos bundled with scikit-image. --smoke makes a run small
enough for a laptop CPU (tiny trunk, 200 steps); drop it for the full-scale settings.
"""

import os
import signal
import sys

INTERRUPTED_AT_START = "error: interrupted (Ctrl-C) while starting; nothing was saved"


def _leave(message: str, code: int) -> None:
    """Prints `message` and exits at once: how the program ends early (see `run`).

    Not by unwinding: the input pipelines may still be running numpy_function calls;
    tearing them down in interpreter shutdown can deadlock on the GIL (seen after an
    out-of-memory batch), and nothing is left to save: checkpoints are atomic, the lock dies
    with the process. While modules load, an import cannot be unwound cleanly either.
    """
    print(message, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _interrupted_while_importing(signum: int, frame: object) -> None:
    _leave(INTERRUPTED_AT_START, 128 + signum)


if __name__ == "__main__":
    # Ctrl-C while TensorFlow loads (seconds) ends as one before training does (see `run`),
    # not with an import traceback; `run` takes SIGINT over once the imports are done.
    signal.signal(signal.SIGINT, _interrupted_while_importing)

from mtss_train import startup  # noqa: F401, E402  First: quiets TensorFlow's start-up logs.

import functools  # noqa: E402
import shutil  # noqa: E402

from absl import app, flags  # noqa: E402

from mtss_train.ckpt import checkpoint_files  # noqa: E402
from mtss_train.compat import tf  # noqa: E402
from mtss_train.configs import expand_config, shipped_configs  # noqa: E402
from mtss_train.errors import (INTERRUPTED_EXIT_CODE, MtssError, ctrl_c_wins, message,  # noqa: E402
                               raise_keyboard_interrupt)
from mtss_train.eval.neighbours import training_neighbours  # noqa: E402
from mtss_train.train.config import build_tasks  # noqa: E402
from mtss_train.train.config_flags import TrainConfigFlags, heading  # noqa: E402
from mtss_train.train.distribution import parameter_server_cluster, serve_if_server, watch_workers  # noqa: E402
from mtss_train.train.trainer import Trainer  # noqa: E402

_CONFIG = flags.DEFINE_string(
    "config", None, f"A shipped configuration (absl flagfile in mtss_train/configs): {', '.join(shipped_configs())}. "
    "Flags given beside it override it.", module_name=heading("run"))
_SETTINGS = TrainConfigFlags()  # One flag per TrainConfig setting, --task_param and --smoke.
_CHIEF_GONE_SECONDS = flags.DEFINE_float(
    "chief_gone_seconds", 60, "--strategy parameter_server: a worker or parameter server leaves (exit 0) once the "
    "chief it served has not answered for this long, so the scheduler sees the job end.", lower_bound=0,
    module_name=heading("distribution"))
_WORKERS_GONE_SECONDS = flags.DEFINE_float(
    "workers_gone_seconds", 300, "--strategy parameter_server: the chief gives up (exit 2, naming the workers and the "
    "last checkpoint) once none of its workers has answered for this long (10 minutes at least before the first "
    "answer); the same command resumes.", lower_bound=1, module_name=heading("distribution"))
for _flag in (_CONFIG, _CHIEF_GONE_SECONDS, _WORKERS_GONE_SECONDS):  # Listed under their topics, and in --help.
    flags.declare_key_flag(_flag)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {argv[1:]}; everything is a --flag")
    tf.get_logger().setLevel("WARNING")  # tf.distribute logs every all-reduce at INFO.
    config = _SETTINGS.config()
    cluster = None
    if config.strategy == "parameter_server":  # Its workers and ps fail on bad flags as the chief does.
        config.validate()
        build_tasks(config)
        cluster = parameter_server_cluster()
        if serve_if_server(cluster, _CHIEF_GONE_SECONDS.value):  # This process is a worker or ps.
            return
        watch_workers(cluster, _WORKERS_GONE_SECONDS.value, lambda lost, seconds: _leave(
            f"error: {workers_gone(lost, seconds, config.train_dir)}", 2))
    pictures = [functools.partial(training_neighbours, config.eval_data, config.trunk_size)] if config.eval_data else []
    trainer = Trainer(config, cluster, pictures)
    checkpoint = trainer.train()
    if trainer.chief:
        print(describe_outputs(trainer.config.train_dir, checkpoint, trainer.summary_dir))
    if trainer.stopped_by:
        sys.exit(128 + trainer.stopped_by)  # The shell's convention for "ended by signal N".


def workers_gone(workers: list[str], seconds: float, train_dir: str) -> str:
    """Why a parameter-server chief gave up on its workers, and how to go on."""
    latest = checkpoint_files.latest(train_dir)
    return (f"none of the workers {', '.join(workers)} has answered for {seconds:g} s; the last checkpoint is "
            f"{latest or f'none yet in {train_dir}'}; start the workers again and run the same command to resume")


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
    """Runs the program; the one place that decides how it ends early, each way with one line.

    An MtssError: "error: <what and where>", exit 2. Ctrl-C before training (flag parsing,
    building, a KeyboardInterrupt TensorFlow turned into another error): INTERRUPTED_AT_START,
    exit 130. Ctrl-C or SIGTERM during training: the trainer saves the step and says so, and
    `main` exits 128 + the signal. absl reports bad flag values and --help itself.
    """
    signal.signal(signal.SIGINT, raise_keyboard_interrupt)  # Imports done: Ctrl-C is KeyboardInterrupt, remembered.
    try:
        with ctrl_c_wins():
            app.run(main, argv=expand_config(sys.argv))
    except MtssError as e:
        _leave(f"error: {message(e)}", 2)
    except KeyboardInterrupt:  # The training loop stops on Ctrl-C itself: this one came before it.
        _leave(INTERRUPTED_AT_START, INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    run()
