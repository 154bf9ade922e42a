"""The paper's two claims at a scale two CPU cores can run, by one command.

    python -m mtss_train.eval.reproduce [--out runs/reproduce] [--seeds 0,1,2] [--steps N]

Claim 1: each self-supervised task gives block3 a better representation than random init.
Claim 2: a combination of tasks beats every task alone; three are trained: all four tasks,
all four with the paper's harmonization and lasso (`--harmonize --lasso`), and rp+ex (the
tasks that apply to the grey probe images themselves). For each seed, one random
tiny slim ResNet-v2 trunk (the 101's code path with fewer units) is written as a checkpoint;
every arm warm-starts from it and trains on the same number of task batches (the budget: a
combination's steps are shared round-robin, so it gets no more updates than one task), then
the linear probe of `mtss_train.eval.linear_probe` judges the random trunk and every trained
one on the same Fashion-MNIST split (3x3 pooled block3, L2 chosen on a validation split of
the training images, the test split scored once). Every trunk is probed twice: with the
BatchNorm statistics it was trained with, and with them re-estimated on the probe's training
images (`mtss_train.recalibrate_bn`; a multi-task trunk's statistics average over every
task's inputs). Results: a table of both columns (mean +- std over seeds) on stdout, and in
--out `results.json` and `results.png` (the table as bars, random init as a line).

Unlabelled data. rp and ex read the 60,000 Fashion-MNIST training images (labels never read),
enlarged to the probe's 96 px exactly as the probe enlarges them. Fashion-MNIST is grey, so
it has no colour to predict: col reads the colour data every install has, the embedded
street clip's frames plus scikit-image's photos. ms reads the embedded clip's motion masks,
the only video that ships. Every run is a `python -m mtss_train` process, as a user runs it;
an arm whose final checkpoint exists is not trained again and a half-trained one resumes, so
a killed run picks up where it was.

Arms beyond the seven: `--arms` also takes tasks joined by '+' (or one of the seven's names)
with trainer settings or its tasks' settings, each after an '@', e.g.
`rp+ex@schedule=all@balance=pcgrad` or `ex@ex.loss=infonce`: the arm trains as the tasks do
elsewhere here plus those settings, which the table names and results.json records. The budget is counted in task batches, one per step of a round-robin
arm: with `schedule=all` every step trains each of the arm's T tasks on its own batch, so
such an arm runs --steps / T steps and sees the same examples at the same cost in T times
fewer updates.

Repeatable: on CPU the same command on the same machine gives the same figures (all but
the training minutes) as it stands, since training and probing repeat bit for bit there
(tests/test_reproduce.py runs it twice); on GPUs pass `--deterministic`, which trains every
arm with it and probes under op determinism, at a cost (README). `results.json` records the
commit of this code and the one that trained each arm; an arm that another commit trained
is refused (one table, one commit) unless `--reuse_other_commits`.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import os

# As in linear_probe: the probe's thin matrix products gain nothing from more BLAS threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Mapping

import cv2
import numpy as np
from absl import app, flags

from mtss_train.ckpt import checkpoint_files
from mtss_train import loader, recalibrate_bn
from mtss_train.compat import tf
from mtss_train.data.clip import sample_clip_masks
from mtss_train.data.files import write_atomically
from mtss_train.data.labelled import fit_square, read_idx
from mtss_train.data.masks import FRAMES_DIR
from mtss_train.data.sample import sample_photo_paths
from mtss_train.errors import DataError, MtssError, cli_main
from mtss_train.progress import duration
from mtss_train.provenance import code_version
from mtss_train.task import make_config, task_class
from mtss_train.train.config import TrainConfig
from mtss_train.eval import compare
from mtss_train.eval import features as feats
from mtss_train.eval import linear_probe
from mtss_train.eval import plots


@dataclasses.dataclass(frozen=True)
class Arm:
    """Tasks pre-trained together, trainer settings of this arm beyond TRAIN_FLAGS (flag
    name -> value, as flags.json records them), and task settings beyond TASK_PARAMS
    (task -> {field: text}, as `--task_param` takes them)."""

    tasks: tuple[str, ...]
    settings: Mapping[str, bool | int | float | str] = dataclasses.field(default_factory=dict)
    task_params: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    def all_task_params(self) -> dict[str, dict[str, str]]:
        """Each task's settings as this arm trains it: TASK_PARAMS with the arm's own over them."""
        return {task: {**{key: str(value) for key, value in TASK_PARAMS[task].items()},
                       **self.task_params.get(task, {})} for task in self.tasks}


RANDOM_ARM = "random"
SETTING_MARK = "@"  # In an arm's name: rp+ex@schedule=all@balance=pcgrad.
# What every arm shares (the budget, the seeds, the data) or the plan sets: not an arm's setting.
NOT_ARM_SETTINGS = {"tasks", "task_params", "train_dir", "init_checkpoint", "max_steps", "seed", "learning_rate",
                    "data", "eval_data", "deterministic", "version"}
# Three combinations: all four tasks (col and ms on their own data), plain and with the
# paper's harmonization and lasso, and the tasks that apply to the grey Fashion-MNIST images
# themselves. Names become directory names ('+' as '_').
ALL_FOUR = ("rp", "col", "ex", "ms")
ARMS = {"rp": Arm(("rp",)), "col": Arm(("col",)), "ex": Arm(("ex",)), "ms": Arm(("ms",)),
        "rp+col+ex+ms": Arm(ALL_FOUR),
        "rp+col+ex+ms-harm-lasso": Arm(ALL_FOUR, {"harmonize": True, "lasso": True}),
        "rp+ex": Arm(("rp", "ex"))}
# The two probes of every trunk: BatchNorm statistics as trained, and re-estimated.
COLUMNS = ("plain", "recalibrated_bn")
TARGET_GAIN = 0.04  # Issue 13: the best pre-trained trunk should beat random init by 4 points.
TIMING_FILE = "reproduce_timing.json"  # In each train dir: how long its training took.
IMAGE_SIZE = 96  # The tiny trunk's probe input side (features.DEFAULT_IMAGE_SIZE).
TRUNK_SIZE = "tiny"
INIT_BASENAME = "init"

# Each task's settings for 96 px inputs on the tiny trunk (the defaults are the paper's, for
# ~400 px ImageNet images and the 101). rp: a 3x3 grid of 32 px patches with 8 px gaps over
# the image enlarged to 120 px; ex: seed patches of half to all of the image, since the
# garment fills a Fashion-MNIST image; col and ms: 96 px crops, as the probe sees.
TASK_PARAMS = {
    "rp": {"batch_size": 32, "patch_size": 32, "gap": 8, "jitter": 4, "min_pixels": 120 * 120,
           "max_pixels": 120 * 120},
    "ex": {"batch_size": 32, "crop_size": IMAGE_SIZE, "seed_fraction": "0.5,1.0"},
    "col": {"batch_size": 16, "crop": IMAGE_SIZE, "resize_side": 128},
    "ms": {"batch_size": 16, "crop": IMAGE_SIZE},
}
# Shared by every arm; the rest are the trainer's defaults.
TRAIN_FLAGS = ("--batch_norm_decay=0.9",)  # Short runs need fast BN moving averages.

_OUT = flags.DEFINE_string("out", "runs/reproduce", "Working directory: data, one train dir per arm and seed, results.json.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each one a random init, data order and probe split.")
_STEPS = flags.DEFINE_integer("steps", 1500, "The budget: task batches of every arm, one per optimizer step (a "
                              "schedule=all step takes one of each of its T tasks, so it runs --steps / T).",
                              lower_bound=1)
_ARMS = flags.DEFINE_list("arms", list(ARMS), f"Arms to pre-train (the random init is always probed): {', '.join(ARMS)}; "
                          "or tasks joined by '+', or one of those, with trainer settings each after an '@', e.g. "
                          "rp+ex@schedule=all@balance=pcgrad.")
_FASHION_MNIST = flags.DEFINE_string("fashion_mnist", "/usr/share/datasets/fashion-mnist",
                                     "Directory of Fashion-MNIST's idx files (Debian: dataset-fashion-mnist).")
_UNLABELLED_LIMIT = flags.DEFINE_integer("unlabelled_limit", None, "Use the first N training images for pre-training.", lower_bound=1)
_PROBE_LIMIT = flags.DEFINE_integer("probe_limit", 10_000, "Probe on the first N training and N test images.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.01, "Peak learning rate of every arm (chosen on the probe's validation split, README).", lower_bound=0)
_RECALIBRATE_BATCHES = flags.DEFINE_integer(
    "recalibrate_batches", recalibrate_bn.DEFAULT_BATCHES, "The recalibrated column re-estimates BatchNorm "
    "statistics on this many batches of 64 of the probe's training images, at most.", lower_bound=1)
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", False, "Train every arm with --deterministic and probe under TensorFlow's op determinism: for "
    "GPUs (on CPU the figures repeat without it: tests/test_reproduce.py).")
_REUSE_OTHER_COMMITS = flags.DEFINE_bool(
    "reuse_other_commits", False, "Use arms that --out holds from another commit of this code (flags.json says "
    "which) instead of refusing: their numbers may not be what this commit gives.")
_TINY = flags.DEFINE_bool("tiny", False, "A check that everything runs: 4 steps, 300 unlabelled and 200 probe images, seed 0.")


@dataclasses.dataclass(frozen=True)
class Plan:
    out: str
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    steps: int
    learning_rate: float
    fashion_mnist: str
    unlabelled_limit: int | None
    probe_limit: int
    recalibrate_batches: int
    reuse_other_commits: bool = False
    deterministic: bool = False

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out, "data")

    def train_dir(self, arm: str, seed: int) -> str:
        return os.path.join(self.out, "arms", arm.replace("+", "_"), f"seed{seed}")

    def init_dir(self, seed: int) -> str:
        return os.path.join(self.out, "init", f"seed{seed}")


def arm_of(name: str) -> Arm:
    """The arm `name` stands for: one of ARMS, or tasks (or one of ARMS) followed by trainer
    settings or settings of its tasks, each after an '@', as `rp+ex@schedule=all@balance=pcgrad`
    or `ex@ex.loss=infonce`.

    Raises:
      MtssError: naming what it cannot read.
    """
    if name in ARMS:
        return ARMS[name]
    base, *assignments = name.split(SETTING_MARK)
    tasks = ARMS[base].tasks if base in ARMS else tuple(base.split("+"))
    unknown = [task for task in tasks if task not in TASK_PARAMS]
    if unknown or not assignments and base not in ARMS:
        raise MtssError(f"--arms: {name!r} is not one of {', '.join(ARMS)}, nor tasks of {', '.join(TASK_PARAMS)} "
                        f"joined by '+' with settings after '{SETTING_MARK}' (e.g. rp+ex@schedule=all@balance=pcgrad)")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig) if field.name not in NOT_ARM_SETTINGS}
    settings = dict(ARMS[base].settings) if base in ARMS else {}
    task_params: dict[str, dict[str, str]] = {}
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        task, dot, field = key.partition(".")
        if dot:
            if task not in tasks:
                raise MtssError(f"--arms: {name!r} sets {key!r}, but {task!r} is not among its tasks")
            task_params.setdefault(task, {})[field] = text
            continue
        if key not in fields or not isinstance(fields[key].default, (bool, int, float, str)):
            raise MtssError(f"--arms: {name!r} sets {key!r}, which is no trainer setting an arm may change: "
                            f"{', '.join(k for k, f in fields.items() if isinstance(f.default, (bool, int, float, str)))}")
        settings[key] = _typed(fields[key].default, text, name)
    found = Arm(tasks, settings, task_params)
    for task, params in found.all_task_params().items():
        try:
            make_config(task_class(task), params).validate()
        except MtssError as e:
            raise MtssError(f"--arms: {name!r}: {e}") from None
    return found


def _typed(default: bool | int | float | str, text: str, arm: str) -> bool | int | float | str:
    """`text` as a value of `default`'s type, as flags.json records it."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise MtssError(f"--arms: {arm!r} gives {text!r} where true or false goes")
        return text.lower() == "true"
    try:
        return type(default)(text)
    except ValueError:
        raise MtssError(f"--arms: {arm!r} gives {text!r} where a {type(default).__name__} goes") from None


def plan_from_flags() -> Plan:
    try:
        seeds = tuple(int(s) for s in _SEEDS.value)
    except ValueError:
        raise MtssError(f"--seeds takes integers, got {','.join(_SEEDS.value)}") from None
    if not _ARMS.value or not seeds:
        raise MtssError("--arms and --seeds need one value at least")
    for arm in _ARMS.value:
        arm_of(arm)  # Refuses what it cannot read.
    plan = Plan(os.path.abspath(_OUT.value), seeds, tuple(_ARMS.value), _STEPS.value, _LEARNING_RATE.value,
                _FASHION_MNIST.value, _UNLABELLED_LIMIT.value, _PROBE_LIMIT.value, _RECALIBRATE_BATCHES.value,
                _REUSE_OTHER_COMMITS.value, _DETERMINISTIC.value)
    if _TINY.value:
        plan = dataclasses.replace(plan, seeds=seeds[:1], steps=4, unlabelled_limit=300, probe_limit=200)
    return plan


def fashion_mnist_split(plan: Plan, split: str) -> str:
    """The idx prefix of a Fashion-MNIST split ('train' or 't10k')."""
    prefix = os.path.join(plan.fashion_mnist, split)
    if not os.path.isfile(prefix + "-images-idx3-ubyte.gz"):
        raise DataError(f"Fashion-MNIST is not in {plan.fashion_mnist} (no {split}-images-idx3-ubyte.gz): "
                        "install Debian's dataset-fashion-mnist or pass --fashion_mnist")
    return prefix


def write_unlabelled_images(plan: Plan) -> str:
    """Fashion-MNIST's training images as PNG TFRecords at the probe's size; labels left out.

    Written once under --out (atomically: `write_atomically`), reused by later runs."""
    limit = plan.unlabelled_limit
    path = os.path.join(plan.data_dir, f"fashion_mnist_train_{IMAGE_SIZE}px_{limit or 'all'}.tfrecord")
    if os.path.isfile(path):
        return path
    images = read_idx(fashion_mnist_split(plan, "train") + "-images-idx3-ubyte.gz")[:limit]
    os.makedirs(plan.data_dir, exist_ok=True)

    def write(temporary: str) -> None:
        with tf.io.TFRecordWriter(temporary) as writer:
            for image in images:
                png = cv2.imencode(".png", fit_square(image, IMAGE_SIZE))[1].tobytes()
                feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())

    write_atomically(path, write)
    return path


def colour_image_dir(plan: Plan) -> str:
    """A directory of links to the colour images every install has: the embedded clip's
    frames and scikit-image's photos (the clip alone is one street seen from one camera)."""
    directory = os.path.join(plan.data_dir, "colour")
    os.makedirs(directory, exist_ok=True)
    targets = {"street_clip_frames": os.path.join(sample_clip_masks(), FRAMES_DIR)}
    targets.update({os.path.basename(p): p for p in sample_photo_paths()})
    for name, target in targets.items():
        link = os.path.join(directory, name)
        if os.path.islink(link) and os.readlink(link) != target:
            os.remove(link)  # The clip's cache moved (other extractor settings or cache dir).
        if not os.path.lexists(link):
            os.symlink(target, link)
    return directory


def write_init_checkpoint(plan: Plan, seed: int) -> str:
    """The seed's random trunk as a slim-name checkpoint: every arm of the seed starts here."""
    directory = plan.init_dir(seed)
    found = checkpoint_files.latest(directory)
    if found:
        return found
    tf.random.set_seed(seed)
    layer = loader.trunk_layer(TRUNK_SIZE)
    return checkpoint_files.save(directory, {n: v.numpy() for n, v in layer.variables_by_name().items()}, 0,
                            basename=INIT_BASENAME)


def arm_steps(plan: Plan, arm: str) -> int:
    """The arm's optimizer steps: the budget of --steps task batches, of which a step of
    `schedule=all` trains one per task."""
    found = arm_of(arm)
    return max(plan.steps // len(found.tasks), 1) if found.settings.get("schedule") == "all" else plan.steps


def train_command(plan: Plan, arm: str, seed: int, init: str, sources: dict[str, str]) -> list[str]:
    tasks = arm_of(arm).tasks
    steps = arm_steps(plan, arm)
    command = [sys.executable, "-m", "mtss_train", f"--tasks={','.join(tasks)}", f"--trunk_size={TRUNK_SIZE}",
               f"--train_dir={plan.train_dir(arm, seed)}", f"--init_checkpoint={init}",
               f"--max_steps={steps}", f"--seed={seed}", f"--learning_rate={plan.learning_rate}",
               f"--save_every_steps={max(steps // 4, 1)}", f"--summary_every_steps={max(steps // 10, 1)}",
               f"--log_every_steps={max(steps // 10, 1)}", *TRAIN_FLAGS,
               *(["--deterministic"] if plan.deterministic else []),
               *(f"--{key}={value}" for key, value in arm_of(arm).settings.items())]
    if "rp" in tasks or "ex" in tasks:
        command.append(f"--data={sources['fashion_mnist']}")
    if "col" in tasks:
        command.append(f"--task_param=col.data={sources['colour']}")
    for task, params in arm_of(arm).all_task_params().items():
        command += [f"--task_param={task}.{key}={value}" for key, value in params.items()]
    return command


def check_earlier_run(plan: Plan, arm: str, seed: int, init: str) -> None:
    """Refuses a train dir that an earlier run of other settings, or of other code, left:
    using it would mix budgets, learning rates or commits within one table.

    Raises:
      MtssError: naming the first setting that differs, or both commits.
    """
    directory = plan.train_dir(arm, seed)
    path = os.path.join(directory, "flags.json")
    checkpoint = checkpoint_files.latest(directory)
    if not os.path.isfile(path):
        if checkpoint:
            raise MtssError(f"{directory} holds {checkpoint} but no flags.json, so what trained it is unknown: pass "
                            "another --out (or remove that directory)")
        return
    with open(path) as f:
        earlier = json.load(f)
    wanted = {"max_steps": arm_steps(plan, arm), "learning_rate": plan.learning_rate, "seed": seed,
              "init_checkpoint": init, **arm_of(arm).settings}
    found = {key: earlier.get(key) for key in wanted}
    # A flags.json older than --deterministic trained without it.
    wanted["deterministic"], found["deterministic"] = plan.deterministic, earlier.get("deterministic", False)
    for task, params in arm_of(arm).all_task_params().items():
        given = earlier.get("task_params", {}).get(task, {})
        for key, value in params.items():
            wanted[f"{task}.{key}"], found[f"{task}.{key}"] = value, given.get(key)
    for key, value in wanted.items():
        if found[key] != value:
            raise MtssError(f"{directory} holds a run with {key} {found[key]!r}, this one asks for "
                            f"{value!r}: pass another --out (or remove that directory)")
    trained_at = earlier.get("commit") or "unknown (before flags.json said)"
    if checkpoint is None or trained_at == code_version():
        return  # Nothing trained yet (a run killed before its first save starts afresh), or this code.
    if not plan.reuse_other_commits:
        raise MtssError(f"{directory} was trained by commit {trained_at}, this is {code_version()}: one table would "
                        "mix two commits; pass another --out, or --reuse_other_commits to use it anyway")
    if not checkpoint.endswith(f"-{arm_steps(plan, arm)}"):
        raise MtssError(f"{directory} is half-trained by commit {trained_at}: resuming it with {code_version()} would "
                        "mix two commits in one checkpoint (--reuse_other_commits uses finished arms only); pass "
                        "another --out")


def trained_by(plan: Plan, arm: str, seed: int) -> str | None:
    """The commit that trained the arm (its flags.json's), None if it does not say."""
    try:
        with open(os.path.join(plan.train_dir(arm, seed), "flags.json")) as f:
            return json.load(f).get("commit")
    except FileNotFoundError:
        return None


def pretrain(plan: Plan, arm: str, seed: int, init: str, sources: dict[str, str]) -> float:
    """Trains one arm to the budget in its own process; its progress lines are shown, all of
    its output is kept in train.log. Returns the seconds its training took (recorded beside
    the checkpoint, so a run that finds the arm trained reports them too).

    Raises:
      MtssError: the run failed, with its last line and the log's path.
    """
    directory = plan.train_dir(arm, seed)
    check_earlier_run(plan, arm, seed, init)
    timing = os.path.join(directory, TIMING_FILE)
    done = checkpoint_files.latest(directory)
    if done and done.endswith(f"-{arm_steps(plan, arm)}") and os.path.isfile(timing):
        with open(timing) as f:
            return json.load(f)["seconds"]
    os.makedirs(directory, exist_ok=True)
    log_path = os.path.join(directory, "train.log")
    start = time.monotonic()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "a") as log, subprocess.Popen(
            train_command(plan, arm, seed, init, sources), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env) as process:
        last = ""
        for line in process.stdout:
            log.write(line)
            if line.strip():
                last = line.strip()
            if " step " in line and "eta" in line:
                print(f"    {arm} seed {seed}: {line.split('] ', 1)[-1].strip()}", file=sys.stderr, flush=True)
    if process.returncode != 0:
        raise MtssError(f"pre-training {arm} (seed {seed}) failed with exit code {process.returncode}: "
                        f"{last} (full output: {log_path})")
    seconds = time.monotonic() - start
    # Atomically: a run killed while writing it would leave JSON the next run cannot parse.
    write_atomically(timing, lambda temporary: pathlib.Path(temporary).write_text(json.dumps({"seconds": seconds})))
    return seconds


def probe(plan: Plan, name: str, checkpoint: str, seed: int, column: str) -> dict:
    """The linear probe's result for one trunk, on the plan's Fashion-MNIST split; for the
    `recalibrated_bn` column, BatchNorm statistics re-estimated on its training images."""
    train, test = linear_probe.open_splits(fashion_mnist_split(plan, "train"), fashion_mnist_split(plan, "t10k"))
    settings = feats.Settings(trunk_size=TRUNK_SIZE, grid=3, image_size=IMAGE_SIZE, seed=seed)
    recalibrate_batches = plan.recalibrate_batches if column == "recalibrated_bn" else None
    result = linear_probe.run_probe(checkpoint, train, test, settings, plan.probe_limit,
                                    os.path.join(plan.out, "feature_cache"), recalibrate_batches, seed=seed,
                                    l2_grid=linear_probe.DEFAULT_L2_GRID, val_fraction=0.2, max_iter=1000)
    print(f"    {name} seed {seed}: {linear_probe.summary(result)}", file=sys.stderr, flush=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(plan: Plan, runs: dict[str, dict[int, dict]], train_seconds: dict[str, dict[int, float]],
              commits: dict[str, dict[int, str | None]]) -> dict:
    """Per-arm means of both columns and the two claims' figures per column, from per-arm,
    per-seed results (`runs[arm][seed][column]`, a probe result), training seconds and the
    commit that trained each (`commits`; None for random init)."""
    arms = {}
    for arm, by_seed in runs.items():
        found = Arm(()) if arm == RANDOM_ARM else arm_of(arm)
        arms[arm] = {"tasks": list(found.tasks), "trainer_settings": dict(found.settings),
                     "task_settings": {task: dict(params) for task, params in found.task_params.items()},
                     "trained_by": {str(s): commits[arm][s] for s in plan.seeds},
                     "train_seconds": {str(s): train_seconds[arm][s] for s in plan.seeds},
                     "train_seconds_mean": statistics.fmean(train_seconds[arm][s] for s in plan.seeds)}
        for column in COLUMNS:
            mean, std = mean_std([by_seed[s][column]["test_top1"] for s in plan.seeds])
            arms[arm][column] = {"test_top1_mean": mean, "test_top1_std": std,
                                 "val_top1_mean": statistics.fmean(by_seed[s][column]["val_top1"] for s in plan.seeds),
                                 "seeds": {str(s): by_seed[s][column] for s in plan.seeds}}
    return {"arms": arms, "claims": {column: _claims(plan, arms, column) for column in COLUMNS}}


def _claims(plan: Plan, arms: dict, column: str) -> dict:
    """The claims' figures within one column (each arm against random init probed alike)."""
    top1 = {arm: found[column]["test_top1_mean"] for arm, found in arms.items()}
    singles = [a for a in plan.arms if len(arm_of(a).tasks) == 1]
    best_single = max(singles, key=top1.get) if singles else None
    best = max(plan.arms, key=top1.get)
    return {
        "best_arm": best, "best_gain_over_random": top1[best] - top1[RANDOM_ARM],
        "best_single_task": best_single,
        "arms_beating_random": [a for a in plan.arms if top1[a] > top1[RANDOM_ARM]],
        "combination_minus_best_single": {
            a: top1[a] - top1[best_single] for a in plan.arms if len(arm_of(a).tasks) > 1 and best_single},
    }


def verdicts(summary: dict) -> str:
    """The issue's targets against the figures, per column: the best arm >= random +
    TARGET_GAIN, and a combination >= the best single task (means over seeds)."""
    lines = []
    for column, claims in summary["claims"].items():
        gain = claims["best_gain_over_random"]
        lines.append(f"{column}: claim 1: best arm {claims['best_arm']} {100 * gain:+.2f} pt over random (target "
                     f"+{100 * TARGET_GAIN:.0f}: {'met' if gain >= TARGET_GAIN else 'not met'}); beating random: "
                     f"{', '.join(claims['arms_beating_random']) or 'none'}")
        for arm, difference in claims["combination_minus_best_single"].items():
            lines.append(f"{column}: claim 2: {arm} {100 * difference:+.2f} pt vs the best single task "
                         f"{claims['best_single_task']} ({'met' if difference >= 0 else 'not met'})")
    return "\n".join(lines)


def table(summary: dict) -> str:
    """One row per arm: test top-1 with BatchNorm statistics as trained and recalibrated,
    each against random init probed the same way."""
    arms = summary["arms"]
    rows = [("arm", "plain top-1 (mean +- std)", "vs random", "recalibrated BN top-1", "vs random",
             "per seed (plain / recal.)", "train min")]
    for arm, found in arms.items():
        cells = []
        for column in COLUMNS:
            random_mean = arms[RANDOM_ARM][column]["test_top1_mean"]
            mean = found[column]["test_top1_mean"]
            cells += [f"{mean:.4f} +- {found[column]['test_top1_std']:.4f}",
                      "" if arm == RANDOM_ARM else f"{100 * (mean - random_mean):+.2f} pt"]
        per_seed = " ".join(f"{found['plain']['seeds'][s]['test_top1']:.4f}/"
                            f"{found['recalibrated_bn']['seeds'][s]['test_top1']:.4f}" for s in found["train_seconds"])
        rows.append((arm, *cells, per_seed, f"{found['train_seconds_mean'] / 60:.1f}"))
    return compare.aligned(rows)


def write_chart(result: dict, path: str) -> None:
    """The table as a bar chart at `path` (PNG): test top-1 mean +- std over seeds per
    trained arm, plain and recalibrated BN side by side, random init as a line per column."""
    arms = result["arms"]
    trained = [arm for arm in arms if arm != RANDOM_ARM]
    stat = {key: np.array([[arms[arm][column][f"test_top1_{key}"] for column in COLUMNS] for arm in trained])
            for key in ("mean", "std")}
    seeds = len(arms[RANDOM_ARM]["train_seconds"])
    figure = plots.reproduce_figure(trained, COLUMNS, stat["mean"], stat["std"],
                                    [arms[RANDOM_ARM][column]["test_top1_mean"] for column in COLUMNS],
                                    f"Linear probe on Fashion-MNIST per pre-training arm, {seeds} seed(s); "
                                    f"{result['budget']}")
    plots.save(figure, path)


def budget_line(plan: Plan) -> str:
    return (f"budget: {plan.steps} task batches per arm ({TRUNK_SIZE} trunk, learning rate "
            f"{plan.learning_rate:g}; one per step: a combination's steps are shared round-robin by its tasks, "
            f"or, with {SETTING_MARK}schedule=all, each of --steps / T steps trains all T of them); "
            f"probe: first {plan.probe_limit:,} Fashion-MNIST training / test images, BatchNorm as trained "
            f"and re-estimated on at most {plan.recalibrate_batches} batches of those training images, seeds "
            f"{','.join(map(str, plan.seeds))}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {' '.join(argv[1:])}; everything is a --flag")
    plan = plan_from_flags()
    if plan.deterministic:  # The probes run here (features, BatchNorm re-estimation).
        tf.config.experimental.enable_op_determinism()
        # Op determinism refuses unseeded random ops, e.g. initializers that a restore overwrites.
        tf.random.set_seed(0)
    print(budget_line(plan), file=sys.stderr, flush=True)
    sources = {"fashion_mnist": write_unlabelled_images(plan), "colour": colour_image_dir(plan)}
    names = (RANDOM_ARM, *plan.arms)
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in names}
    train_seconds: dict[str, dict[int, float]] = {arm: {} for arm in names}
    commits: dict[str, dict[int, str | None]] = {arm: {} for arm in names}
    jobs = [(arm, seed) for seed in plan.seeds for arm in plan.arms]
    start = time.monotonic()
    for seed in plan.seeds:
        init = write_init_checkpoint(plan, seed)
        runs[RANDOM_ARM][seed] = {column: probe(plan, RANDOM_ARM, init, seed, column) for column in COLUMNS}
        train_seconds[RANDOM_ARM][seed], commits[RANDOM_ARM][seed] = 0.0, None
        for arm in plan.arms:
            done = sum(len(runs[a]) for a in plan.arms)
            elapsed = time.monotonic() - start
            eta = "" if not done else f", ETA {duration(elapsed / done * (len(jobs) - done))}"
            print(f"[{done + 1}/{len(jobs)}] pre-training {arm} (seed {seed}), elapsed {duration(elapsed)}{eta}",
                  file=sys.stderr, flush=True)
            train_seconds[arm][seed] = pretrain(plan, arm, seed, init, sources)
            commits[arm][seed] = trained_by(plan, arm, seed)
            trained = checkpoint_files.latest(plan.train_dir(arm, seed))
            runs[arm][seed] = {column: probe(plan, arm, trained, seed, column) for column in COLUMNS}
    summary = summarise(plan, runs, train_seconds, commits)
    result = {"budget": budget_line(plan), "commit": code_version(),
              "plan": {**dataclasses.asdict(plan), "task_params": TASK_PARAMS, "train_flags": list(TRAIN_FLAGS)},
              **summary}
    path = os.path.join(plan.out, "results.json")
    linear_probe.write_json(result, path)
    write_chart(result, os.path.join(plan.out, "results.png"))
    print(f"{budget_line(plan)}; commit {code_version()}")
    print(table(summary))
    print(verdicts(summary))
    print(f"results: {path}")
    print(f"chart: {os.path.join(plan.out, 'results.png')}")


if __name__ == "__main__":
    app.run(cli_main(main))
