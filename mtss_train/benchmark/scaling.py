"""How the rp step's time and memory grow with batch size and patch size.

Each setting runs in a fresh process (spawned, so no TensorFlow state is forked): its peak
resident memory is then that setting's alone, not the high-water mark of everything this
process did before.
"""

import multiprocessing
from concurrent import futures
from typing import Sequence

import numpy as np

from mtss_train.benchmark.timing import current_rss_mib, interleaved_rounds, peak_rss_mib
from mtss_train.train.config import TrainConfig
from mtss_train.errors import MtssError
from mtss_train.train.trainer import Trainer


def probe(trunk_size: str, batch_size: int, patch_size: int, calls: int, warmup: int,
          data: str | None = None) -> dict[str, float]:
    """Builds the trainer for rp alone and times its step on a fixed batch (in this process).

    Returns:
      batch_size, patch_size; trunk_mpx: megapixels the trunk sees per step
      (2 patches per example); step_s, cpu_s: seconds per step, wall and CPU;
      base_rss_mib (TensorFlow loaded), built_rss_mib (model and optimizer built),
      peak_rss_mib (after the steps): resident memory; step_rss_mib: what the steps
      added to the built model and optimizer (activations, gradients, workspace).
    """
    base = current_rss_mib()
    config = TrainConfig(
        train_dir="/nonexistent-benchmark-dir", tasks=["rp"], data=data, trunk_size=trunk_size,
        task_params={"rp": {"batch_size": str(batch_size), "patch_size": str(patch_size)}},
    )
    trainer = Trainer(config)
    batches = {"rp": next(trainer.iterators(trainer.sources, seed=0)["rp"])}
    trainer.prepare(batches)
    built = current_rss_mib()
    step = trainer.runner.train_step(("rp",))
    samples = interleaved_rounds({"step": lambda: step(batches)}, rounds=1, calls=calls, warmup=warmup)["step"][0]
    return {
        "batch_size": batch_size,
        "patch_size": patch_size,
        "trunk_mpx": 2 * batch_size * patch_size**2 / 1e6,
        "step_s": samples.wall_s,
        "cpu_s": samples.cpu_s,
        "base_rss_mib": base,
        "built_rss_mib": built,
        "peak_rss_mib": peak_rss_mib(),
        "step_rss_mib": peak_rss_mib() - built,
    }


def parse_sizes(values: Sequence[str], flag: str) -> list[int]:
    """Positive integers from a flag's list; MtssError naming `flag` otherwise."""
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise MtssError(f"{flag} must be a comma-separated list of positive integers, got {','.join(values)!r}")
    return numbers


def settings_grid(batch_sizes: Sequence[int], patch_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(batch, patch) pairs: every batch size at the first patch size, then every other
    patch size at the first batch size, so each series varies one thing."""
    grid = [(b, patch_sizes[0]) for b in batch_sizes]
    grid += [(batch_sizes[0], p) for p in patch_sizes[1:]]
    return grid


def scaling_table(trunk_size: str, batch_sizes: Sequence[int], patch_sizes: Sequence[int], calls: int,
                  warmup: int, data: str | None = None) -> list[dict[str, float]]:
    """`probe` of every setting of `settings_grid`, each in its own fresh process, in turn."""
    context = multiprocessing.get_context("spawn")  # Forking a process that runs TF can deadlock.
    rows = []
    for batch_size, patch_size in settings_grid(batch_sizes, patch_sizes):
        with futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            rows.append(pool.submit(probe, trunk_size, batch_size, patch_size, calls, warmup, data).result())
    return rows


def series(rows: Sequence[dict[str, float]], batch_sizes: Sequence[int], patch_sizes: Sequence[int]
           ) -> dict[str, list[dict[str, float]]]:
    """The rows of `scaling_table` split into its two series: 'batch' (all batch sizes at the
    first patch size) and 'patch' (all patch sizes at the first batch size)."""
    return {
        "batch": [r for r in rows if r["patch_size"] == patch_sizes[0]],
        "patch": [r for r in rows if r["batch_size"] == batch_sizes[0]],
    }


def linear_fit(rows: Sequence[dict[str, float]], key: str, size_key: str = "trunk_mpx") -> dict[str, float] | None:
    """`key` as a line in the pixel count, by least squares: key ~ fixed + per_mpx * Mpx.

    Returns:
      {'fixed', 'per_mpx', 'worst_residual': the largest |residual| / value over `rows`
      (0 on an exact line)}, or None for fewer than two distinct sizes.
    """
    sizes = np.array([r[size_key] for r in rows], np.float64)
    if len(set(sizes.tolist())) < 2:
        return None
    values = np.array([r[key] for r in rows], np.float64)
    per_mpx, fixed = np.polyfit(sizes, values, 1)
    residuals = np.abs(values - (fixed + per_mpx * sizes)) / np.abs(values)
    return {"fixed": float(fixed), "per_mpx": float(per_mpx), "worst_residual": float(residuals.max())}
