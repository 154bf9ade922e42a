"""Timing on a shared machine: wall and CPU time per call, interleaved rounds, spreads.

Other processes may load the machine while we measure, so contenders run in interleaved
rounds (A B C, C B A, A B C, ...): each round sees about the same load for every contender,
and the ratio of two contenders is taken within a round. The spread of those per-round
ratios (median, min, max) says how far to trust them. CPU time (all threads of this
process) is recorded too: it is what a core-for-core comparison needs and is less
sensitive than wall time to other processes taking the cores.
"""

import dataclasses
import os
import resource
import statistics
import time
from typing import Callable, Mapping, Sequence

from mtss_train.compat import tf


@dataclasses.dataclass
class Sample:
    """Seconds per call, averaged over `calls` consecutive calls."""

    wall_s: float
    cpu_s: float
    calls: int


def finish(result: object) -> None:
    """Waits for a call's device work by reading its tensors (numpy values pass through)."""
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)


def time_calls(fn: Callable[[], object], calls: int) -> Sample:
    """Wall and process CPU seconds per call of `fn`, over `calls` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = None
    for _ in range(calls):
        result = fn()
    finish(result)
    return Sample((time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls, calls)


def load_average() -> float:
    """The machine's 1-minute load average (runnable processes; compare with os.cpu_count())."""
    return os.getloadavg()[0]


def interleaved_rounds(
    contenders: Mapping[str, Callable[[], object]], rounds: int, calls: int, warmup: int = 3,
) -> dict[str, list[Sample]]:
    """Times every contender in `rounds` interleaved rounds of `calls` calls each.

    Each contender first runs `warmup` untimed calls (tracing, allocation). Odd rounds run
    the contenders in reverse order, so a steady drift in load favours none of them.

    Returns:
      name -> one Sample per round, in round order; also '_load' -> per-round Samples
      whose wall_s holds the 1-minute load average at the round's end.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            finish(fn())
    samples: dict[str, list[Sample]] = {name: [] for name in contenders}
    samples["_load"] = []
    names = list(contenders)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(time_calls(contenders[name], calls))
        samples["_load"].append(Sample(load_average(), 0.0, 0))
    return samples


def spread(values: Sequence[float]) -> dict[str, float]:
    """{'median', 'min', 'max'} of `values` (at least one)."""
    if not values:
        raise ValueError("spread of no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(numerators: Sequence[Sample], denominators: Sequence[Sample], cpu: bool = False) -> list[float]:
    """Per-round ratios of seconds per call (wall, or CPU with `cpu`)."""
    field = "cpu_s" if cpu else "wall_s"
    return [getattr(a, field) / getattr(b, field) for a, b in zip(numerators, denominators, strict=True)]


def _proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (e.g. VmHWM, VmRSS) in MiB; None where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # Reported in kB.
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB.

    VmHWM where Linux has it: ru_maxrss is inherited across fork and exec, so a spawned
    child would report its parent's peak if it was higher.
    """
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident memory now, MiB (the peak where /proc is unavailable)."""
    current = _proc_status_mib("VmRSS")
    return current if current is not None else peak_rss_mib()
