"""Measures the trainer against its anchors, in one run, printed and written as JSON.

    python -m mtss_train.benchmark --out bench.json            # everything, real 101 trunk
    python -m mtss_train.benchmark --parts anchor,flops --rounds 9
    python -m mtss_train.benchmark --trunk_size tiny --steps 2 --rounds 2   # a quick look
    python -m mtss_train.benchmark --parts beam --rounds 3 --beam_frames 265

Parts (`--parts`, default all but beam):
  anchor:     the trainer's rp step against a plain tf_slim TF1-graph step of the same
              trunk on the same batch (fwd + bwd + RMSProp, UPDATE_OPS), and against the
              bare trunk's fwd + bwd, in interleaved rounds in this process: per-round
              ratios trainer/slim and step/trunk with their spread (median, min, max).
  flops:      FLOPs of a trunk step (TensorFlow's cost analysis of the slim graph) per
              second of the slim and trainer steps, against a float32 matmul's FLOP/s
              measured in the same rounds (the machine's practical peak).
  pipelines:  for each of --tasks: its input pipeline alone (OpenCV decoding, and TF ops
              only as parameter-server workers run it), the bare trunk's fwd+bwd, the
              trainer's step on a fixed batch and fed by its pipeline; the pipeline's
              examples per CPU-second against what the trunk consumes.
  extractor:  the ms motion-mask extractor's frames/s on one core at 320x240 and 640x480
              (frames of the bundled clip, resized).
  scaling:    the rp step's time and peak memory over batch sizes and patch sizes, each
              setting in a fresh process, fitted as lines in the pixel count (fixed cost +
              cost per megapixel, and how far the worst setting is off the line).
  beam:       frames/s of the Beam masks pipeline (`python -m mtss_train.data.prepare
              masks`) with 1 and 2 local worker processes on links to the bundled clip;
              needs apache-beam (the `beam` extra). Not in the default: whole pipelines
              in fresh worker processes take minutes.
Peak resident memory of this process is always reported.

On a shared machine, other processes take cores at random moments. Contenders are timed in
interleaved rounds and compared within a round; CPU time (all threads of this process) is
recorded beside wall time. CPU-time ratios barely move with other load; wall-time ratios
are trustworthy when every contender kept the cores busy ("cores busy" near the CPU count).
The load average printed per round counts this process's own busy threads too.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import dataclasses
import importlib.util
import json
import os
from typing import Iterator

from absl import app, flags

from mtss_train.model import trunk
from mtss_train.benchmark import anchors, pipelines, scaling
from mtss_train.benchmark.timing import Sample, interleaved_rounds, load_average, peak_rss_mib, ratios, spread
from mtss_train.compat import tf
from mtss_train.train.config import PRECISIONS, TrainConfig
from mtss_train.errors import MtssError, cli_main
from mtss_train.task import Batch
from mtss_train.train.trainer import Trainer

PARTS = ("anchor", "flops", "pipelines", "extractor", "scaling", "beam")
DEFAULT_PARTS = [part for part in PARTS if part != "beam"]
# Scaling figures fitted as lines in the pixel count. CPU time, not wall time: each setting
# runs at another moment, under whatever else the machine is doing then.
FITTED = ("cpu_s", "peak_rss_mib")
WARMUP_STEPS = 3

_PARTS = flags.DEFINE_list("parts", DEFAULT_PARTS, f"What to measure, any of {', '.join(PARTS)}.")
_TASKS = flags.DEFINE_list("tasks", ["rp", "col", "ex", "ms"], "Tasks whose pipelines to measure.")
_TRUNK_SIZE = flags.DEFINE_enum("trunk_size", "101", list(trunk.TRUNK_SIZES), "Trunk.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size of every task.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 5, f"Timed steps per measurement (after {WARMUP_STEPS} warm-up steps).",
                              lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds of the anchor, flops, extractor and beam parts.",
                               lower_bound=1)
_DATA = flags.DEFINE_string("data", None, "Images (default: the bundled sample photos).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square float32 matmul (flops).",
                                    lower_bound=1)
_EXTRACTOR_FRAMES = flags.DEFINE_integer("extractor_frames", 30, "Clip frames per extractor pass.", lower_bound=2)
_BEAM_VIDEOS = flags.DEFINE_integer("beam_videos", 4, "Links to the clip in the beam part's input (workers "
                                    "take whole videos: an even count splits evenly).", lower_bound=1)
_BEAM_FRAMES = flags.DEFINE_integer("beam_frames", 60, "Frames per video in the beam part (the clip has 265).",
                                    lower_bound=2)
_SCALING_BATCHES = flags.DEFINE_list("scaling_batches", ["4", "8", "16"], "rp batch sizes of the scaling table.")
_SCALING_PATCHES = flags.DEFINE_list("scaling_patches", ["96", "128", "192"], "rp patch sizes of the scaling table.")
_PRECISION = flags.DEFINE_enum("precision", "float32", list(PRECISIONS), "The trainer's compute dtype; the slim "
                                "anchor stays float32, as a slim user runs it.")
_OUT = flags.DEFINE_string("out", None, "Write every figure to this JSON file.")


def build_trainer(tasks: list[str]) -> tuple[Trainer, dict[str, Iterator], dict[str, Batch]]:
    """The trainer of `tasks` (built), their batch iterators and one batch of each."""
    config = TrainConfig(
        train_dir="/nonexistent-benchmark-dir", tasks=tasks, data=_DATA.value, trunk_size=_TRUNK_SIZE.value,
        task_params={t: {"batch_size": str(_BATCH_SIZE.value)} for t in tasks}, precision=_PRECISION.value,
    )
    trainer = Trainer(config)
    iterators = trainer.iterators(trainer.sources, seed=0)
    batches = {name: next(iterator) for name, iterator in iterators.items()}
    trainer.prepare(batches)
    return trainer, iterators, batches


# -- anchor and flops ----------------------------------------------------------------------
def measure_anchors(trainer: Trainer, batch: Batch, parts: list[str]) -> dict[str, dict]:
    """Interleaved rounds of the slim step, the trainer's rp step, and (anchor) the bare
    trunk's fwd+bwd and (flops) the matmul; returns {'anchor': ..., 'flops': ...}."""
    images = trainer.model.trunk_images("rp", batch).numpy()
    slim_step = anchors.SlimStep(images, _TRUNK_SIZE.value, trainer.config)
    train_step = trainer.runner.train_step(("rp",))
    contenders = {"slim": slim_step.step, "step": lambda: train_step({"rp": batch})}
    if "anchor" in parts:
        contenders["trunk"] = pipelines.trunk_gradients_fn(trainer, "rp", batch)
    if "flops" in parts:
        flops = slim_step.step_flops()
        repeats = max(1, round(flops / (2.0 * _MATMUL_SIZE.value**3)))  # About a step's FLOPs per call.
        contenders["matmul"], matmul_flops = anchors.matmul_contender(_MATMUL_SIZE.value, repeats)
    try:
        samples = interleaved_rounds(contenders, _ROUNDS.value, _STEPS.value, WARMUP_STEPS)
    finally:
        slim_step.close()
    result = {}
    if "anchor" in parts:
        result["anchor"] = anchor_summary(samples, list(images.shape))
    if "flops" in parts:
        result["flops"] = {
            "step_flops": flops, "forward_conv_flops": slim_step.forward_conv_flops(),
            "matmul_size": _MATMUL_SIZE.value, "matmul_repeats": repeats,
            "seconds": {name: spread([s.wall_s for s in samples[name]]) for name in ("slim", "step", "matmul")},
            **flop_rates(samples, flops, matmul_flops),
        }
    return result


def anchor_summary(samples: dict[str, list[Sample]], batch_shape: list[int]) -> dict:
    """Per-round samples, seconds and cores busy per contender, and the per-round ratios
    step/slim and step/trunk (wall and CPU time) with their spread."""
    names = [name for name in samples if name != "_load"]
    summary = {
        "batch_shape": batch_shape,
        "rounds": [{"load": load.wall_s, **{n: dataclasses.asdict(samples[n][i]) for n in names}}
                   for i, load in enumerate(samples["_load"])],
        "seconds": {n: spread([s.wall_s for s in samples[n]]) for n in names},
        "cores_busy": {n: spread([s.cpu_s / s.wall_s for s in samples[n]]) for n in names},
    }
    for a, b in (("step", "slim"), ("step", "trunk")):
        summary[f"{a}_over_{b}"] = spread(ratios(samples[a], samples[b]))
        summary[f"{a}_over_{b}_cpu"] = spread(ratios(samples[a], samples[b], cpu=True))
    return summary


def flop_rates(samples: dict[str, list[Sample]], step_flops: float, matmul_flops: float) -> dict[str, dict]:
    """FLOP/s of the matmul and of the slim and trainer steps (wall time), and each step's
    share of the matmul's FLOP/s in the same round, by wall and by CPU time."""
    def rates(name: str, flops: float, field: str) -> list[float]:
        return [flops / getattr(s, field) for s in samples[name]]

    peak = {field: rates("matmul", matmul_flops, field) for field in ("wall_s", "cpu_s")}
    result = {"matmul_flops_per_s": spread(peak["wall_s"])}
    for name in ("slim", "step"):
        result[f"{name}_flops_per_s"] = spread(rates(name, step_flops, "wall_s"))
        for field, suffix in (("wall_s", ""), ("cpu_s", "_cpu")):
            shares = [r / p for r, p in zip(rates(name, step_flops, field), peak[field])]
            result[f"{name}_of_peak{suffix}"] = spread(shares)
    return result


def print_anchor(anchor: dict) -> None:
    names = [n for n in ("slim", "step", "trunk", "matmul") if n in anchor["rounds"][0]]
    print(f"\n== anchor: trainer rp step vs plain tf_slim TF1-graph step, trunk input {anchor['batch_shape']}")
    print("round  load  " + "  ".join(f"{n + ' s':>8}" for n in names) + "  step/slim  step/trunk")
    for i, r in enumerate(anchor["rounds"], 1):
        step = r["step"]["wall_s"]
        print(f"{i:5d}  {r['load']:4.1f}  " + "  ".join(f"{r[n]['wall_s']:8.3f}" for n in names)
              + f"  {step / r['slim']['wall_s']:9.2f}  {step / r['trunk']['wall_s']:10.2f}")
    for key, text in (("step_over_slim", "trainer/bare-slim step time"),
                      ("step_over_slim_cpu", "trainer/bare-slim CPU time"),
                      ("step_over_trunk", "step/trunk time"), ("step_over_trunk_cpu", "step/trunk CPU time")):
        s = anchor[key]
        print(f"{text}: median {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f}) "
              f"over {len(anchor['rounds'])} rounds")
    busy = "  ".join(f"{n} {anchor['cores_busy'][n]['median']:.2f}" for n in names)
    print(f"cores busy (CPU/wall time, median): {busy}; below the CPU count, other processes took cores "
          "and wall ratios are less certain than CPU ratios")


def print_flops(flops: dict) -> None:
    g = 1e9
    print(f"\n== flops: trunk step {flops['step_flops'] / g:.1f} GFLOP (cost analysis; forward convs "
          f"{flops['forward_conv_flops'] / g:.1f} GFLOP)")
    m = flops["matmul_flops_per_s"]
    n = flops["matmul_size"]
    print(f"matmul {n}x{n} float32: median {m['median'] / g:.1f} GFLOP/s "
          f"(min {m['min'] / g:.1f}, max {m['max'] / g:.1f})")
    for name, text in (("slim", "bare slim step"), ("step", "trainer step")):
        rate, share = flops[f"{name}_flops_per_s"], flops[f"{name}_of_peak"]
        cpu = flops[f"{name}_of_peak_cpu"]
        print(f"{text}: {rate['median'] / g:.1f} GFLOP/s = {share['median']:.2f} of matmul "
              f"(per round {share['min']:.2f}-{share['max']:.2f}; by CPU time {cpu['median']:.2f}, "
              f"{cpu['min']:.2f}-{cpu['max']:.2f})")


# -- pipelines, extractor, scaling -------------------------------------------------------
def measure_pipelines(trainer: Trainer, iterators: dict[str, Iterator], batches: dict[str, Batch],
                      tasks: list[str]) -> dict[str, dict]:
    results = {}
    for task in (trainer.model.tasks[name] for name in tasks):
        samples = pipelines.measure_task(trainer, task, batches[task.name], iterators[task.name],
                                         _STEPS.value, WARMUP_STEPS)
        results[task.name] = {
            "examples_per_batch": task.config.batch_size,
            "seconds": {name: dataclasses.asdict(s) for name, s in samples.items()},
            **pipelines.feeding(samples, task.config.batch_size),
        }
        print_pipeline(task.name, results[task.name])
    return results


def print_pipeline(name: str, result: dict) -> None:
    rates = {k: 1 / s["wall_s"] for k, s in result["seconds"].items()}
    print(f"{name}: " + "  ".join(f"{k} {v:.2f} batches/s" for k, v in rates.items()))
    cpu = {k: s["cpu_s"] for k, s in result["seconds"].items()}
    print(f"{name}: step/trunk time {rates['trunk'] / rates['step']:.2f}x  "
          f"input/trained rate {rates['input'] / rates['trained']:.2f}x  "
          f"(CPU time: step/trunk {cpu['step'] / cpu['trunk']:.2f}x, trained/step {cpu['trained'] / cpu['step']:.2f}x)")
    print(f"{name}: input {result['input_per_core']:.1f} examples/s/core; trunk fwd+bwd consumes "
          f"{result['trunk_per_s']:.2f} examples/s ({result['trunk_per_core']:.2f}/s/core): one input core feeds "
          f"{result['input_over_trunk_per_core']:.1f} trunk cores; {result['cores_to_feed']:.2f} cores keep it fed")


def print_extractor(rates: dict) -> None:
    print("\n== extractor: motion masks on one OpenCV thread, frames of the bundled clip")
    for size, r in rates.items():
        print(f"{size}: {r['frames_per_core']:.1f} frames/s/core ({r['frames_per_s']:.1f} frames/s wall, "
              f"{r['frames']} frames, {r['masked']} kept)")


def measure_scaling() -> dict:
    batch_sizes = scaling.parse_sizes(_SCALING_BATCHES.value, "--scaling_batches")
    patch_sizes = scaling.parse_sizes(_SCALING_PATCHES.value, "--scaling_patches")
    rows = scaling.scaling_table(_TRUNK_SIZE.value, batch_sizes, patch_sizes, _STEPS.value, WARMUP_STEPS, _DATA.value)
    split = scaling.series(rows, batch_sizes, patch_sizes)
    return {"rows": rows, "fits": {name: {key: scaling.linear_fit(part, key) for key in FITTED}
                                   for name, part in split.items()}}


def print_scaling(table: dict) -> None:
    print("\n== scaling: rp step, one fresh process per setting")
    print("batch  patch  trunk Mpx  step s  CPU s  CPU s/Mpx  peak MiB  built MiB  step MiB")
    for r in table["rows"]:
        print(f"{r['batch_size']:5d}  {r['patch_size']:5d}  {r['trunk_mpx']:9.3f}  {r['step_s']:6.3f}  "
              f"{r['cpu_s']:5.3f}  {r['cpu_s'] / r['trunk_mpx']:9.2f}  {r['peak_rss_mib']:8.0f}  "
              f"{r['built_rss_mib']:9.0f}  {r['step_rss_mib']:8.0f}")
    units = {"cpu_s": ("CPU s/step", ".3f", ".2f"), "peak_rss_mib": ("peak MiB", ".0f", ".0f")}
    for name, fits in table["fits"].items():
        lines = []
        for key, fit in fits.items():
            label, fixed, slope = units[key]
            lines.append("n/a (one size)" if fit is None else f"{label} ~ {fit['fixed']:{fixed}} + "
                         f"{fit['per_mpx']:{slope}}/Mpx (worst residual {fit['worst_residual']:.0%})")
        print(f"over {name} sizes: " + "; ".join(lines))


def measure_beam() -> dict:
    """The beam part's figures, or why it was skipped: Beam is an optional extra."""
    if importlib.util.find_spec("apache_beam") is None:
        print("\n== beam: skipped, apache-beam is not installed (pip install 'mtss-train[beam]')")
        return {"skipped": "apache-beam is not installed"}
    from mtss_train.benchmark import beam_prepare  # Imports Beam, which only this part needs.

    return beam_prepare.masks_rates(_BEAM_VIDEOS.value, _BEAM_FRAMES.value, _ROUNDS.value)


# -- main ------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    del argv
    parts = _PARTS.value
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise MtssError(f"--parts must name some of {', '.join(PARTS)}; got {','.join(parts) or 'nothing'}")
    out_dir = os.path.dirname(os.path.abspath(_OUT.value)) if _OUT.value else None
    if out_dir and not os.path.isdir(out_dir):  # Found now, not after minutes of measuring.
        raise MtssError(f"--out {_OUT.value}: directory {out_dir} does not exist")
    report = {"settings": {"parts": parts, "tasks": _TASKS.value, "trunk_size": _TRUNK_SIZE.value,
                           "batch_size": _BATCH_SIZE.value, "steps": _STEPS.value, "rounds": _ROUNDS.value,
                           "precision": _PRECISION.value},
              "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__, "load_start": load_average()}}
    print(f"trunk {_TRUNK_SIZE.value}, batch {_BATCH_SIZE.value}, {_STEPS.value} steps, "
          f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'} inter-op threads; "
          f"{os.cpu_count()} CPUs, load {report['machine']['load_start']:.1f}")
    needs_rp = bool({"anchor", "flops"} & set(parts))
    tasks = list(dict.fromkeys((["rp"] if needs_rp else []) + (_TASKS.value if "pipelines" in parts else [])))
    if tasks:
        trainer, iterators, batches = build_trainer(tasks)
        if needs_rp:
            report.update(measure_anchors(trainer, batches["rp"], parts))
            if "anchor" in report:
                print_anchor(report["anchor"])
            if "flops" in report:
                print_flops(report["flops"])
        if "pipelines" in parts:
            print("\n== pipelines: input alone vs the trunk's fwd+bwd (per core: per CPU-second of this process)")
            report["pipelines"] = measure_pipelines(trainer, iterators, batches, _TASKS.value)
    if "extractor" in parts:
        report["extractor"] = pipelines.extractor_rates(_EXTRACTOR_FRAMES.value, _ROUNDS.value)
        print_extractor(report["extractor"])
    if "scaling" in parts:
        report["scaling"] = measure_scaling()
        print_scaling(report["scaling"])
    if "beam" in parts:
        report["beam"] = measure_beam()
    report["machine"]["load_end"] = load_average()
    report["memory"] = {"peak_rss_mib": peak_rss_mib()}
    print(f"\npeak resident memory {report['memory']['peak_rss_mib']:.0f} MiB; "
          f"load {report['machine']['load_end']:.1f}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(cli_main(main))
