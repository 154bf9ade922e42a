"""Name-based checkpoints: slim variable names as keys, written atomically.

A checkpoint here is a TF tensor bundle (`PREFIX.index` + `PREFIX.data-00000-of-00001`)
whose keys are slim names such as `resnet_v2_101/block1/unit_1/bottleneck_v2/conv1/weights`
(never TF2 object-graph keys), so `tf.train.list_variables`, a TF1 `Saver` and the released
model's README recipe all read it. A directory of them has TF's usual `checkpoint` state file.

Saving writes under a temporary prefix, fsyncs, renames the data file and then the index
(the index is what makes a prefix exist) and only then updates the state file with an
atomic rename. A process killed at any point leaves the previous checkpoint intact and
`latest` pointing at it; leftovers are removed by the next save. Damage from outside
(a garbage or empty index, a missing or short data file) is found by `newest_readable`,
so a resume falls back to the newest checkpoint that reads.
"""

import dataclasses
import glob
import json
import os
import re
from typing import Iterable, Mapping

import numpy as np

from mtss_train.compat import tf
from mtss_train.data.files import write_atomically
from mtss_train.errors import CheckpointError, UnreadableCheckpointError

STATE_FILE = "checkpoint"
# A state file a killed save left half-written: write_atomically's `checkpoint.<hex>.tmp`,
# or `checkpoint.tmp<pid>` of saves before it.
_STATE_TEMPORARY = re.compile(re.escape(STATE_FILE) + r"\.([0-9a-f]+\.tmp|tmp\d+)")
DEFAULT_BASENAME = "model.ckpt"


def _prefix_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".index")


def candidates(directory: str) -> list[str]:
    """Complete checkpoint prefixes in `directory`, newest first.

    The index rename is what commits a save, so numbered `NAME-STEP` prefixes with an
    index come by step, whatever the state file says (a save may have been killed before
    updating it); a checkpoint without a step number (e.g. a slim `Saver` file) named by
    the state file comes last.
    """
    if not os.path.isdir(directory):
        return []
    steps = {}
    for index in glob.glob(os.path.join(glob.escape(directory), "*-[0-9]*.index")):
        found = re.search(r"-(\d+)\.index$", index)
        if found:
            steps[int(found.group(1))] = index[: -len(".index")]
    found = [steps[step] for step in sorted(steps, reverse=True)]
    if not found:  # The state file names files by TF's rules; ask TF only when needed.
        prefix = tf.train.latest_checkpoint(directory)
        found += [prefix] if prefix and _prefix_exists(prefix) else []
    return found


def latest(directory: str) -> str | None:
    """The newest complete checkpoint prefix in `directory`, or None if it has none."""
    found = candidates(directory)
    return found[0] if found else None


def check_readable(prefix: str) -> None:
    """Raises UnreadableCheckpointError unless the index reads and the data files hold
    every byte it lists (a cheap check: sizes, not checksums, which a full read verifies)."""
    specs = read_specs(prefix)
    shards = glob.glob(glob.escape(prefix) + ".data-*-of-*")
    if not shards:
        raise UnreadableCheckpointError(f"checkpoint {prefix} has no data file ({os.path.basename(prefix)}.data-*)")
    declared = max(int(re.search(r"-of-(\d+)$", path).group(1)) for path in shards)
    if len(shards) != declared:
        raise UnreadableCheckpointError(f"checkpoint {prefix} has {len(shards)} of its {declared} data files")
    try:
        expected = sum(int(np.prod(s.shape, dtype=np.int64)) * tf.as_dtype(s.dtype).size for s in specs.values())
    except (TypeError, ValueError):  # Variable-size dtypes (strings): no size to compare.
        return
    size = sum(os.path.getsize(path) for path in shards)
    if size < expected:
        raise UnreadableCheckpointError(
            f"checkpoint {prefix} is truncated: its data holds {size} of the {expected} bytes its index lists")


def newest_readable(directory: str, exclude: Iterable[str] = ()) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest readable checkpoint prefix or None, [(newer unreadable prefix, why)])."""
    skipped = []
    for prefix in candidates(directory):
        if prefix in exclude:
            continue
        try:
            check_readable(prefix)
            return prefix, skipped
        except UnreadableCheckpointError as e:
            skipped.append((prefix, str(e)))
    return None, skipped


def set_aside(prefix: str, folder: str = "unreadable") -> str:
    """Moves a checkpoint's files into `folder` beside it (out of every listing and sweep);
    returns where they went."""
    target = os.path.join(os.path.dirname(prefix), folder)
    os.makedirs(target, exist_ok=True)
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.replace(path, os.path.join(target, os.path.basename(path)))
    return target


def resolve(path: str) -> str:
    """Turns a checkpoint directory, prefix, or one of its files into a checkpoint prefix.

    Raises:
      CheckpointError: if nothing at `path` is a checkpoint.
    """
    if os.path.isdir(path):
        prefix = latest(path)
        if prefix is None:
            raise CheckpointError(f"no checkpoint in directory {path} (no *.index file)")
        return prefix
    prefix = re.sub(r"\.(index|data-\d+-of-\d+|meta)$", "", path)
    if _prefix_exists(prefix):
        return prefix
    if os.path.exists(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: expected PREFIX.index beside it "
            "(pass a checkpoint prefix, its .index file, or a training directory)"
        )
    raise CheckpointError(f"checkpoint {path} does not exist")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A variable's shape and dtype name, as a checkpoint or a model holds it."""

    shape: tuple[int, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def read_specs(path: str) -> dict[str, TensorSpec]:
    """Names -> shape/dtype of every tensor in a checkpoint (reads the index only)."""
    prefix = resolve(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as e:
        raise UnreadableCheckpointError(f"cannot read checkpoint {prefix}: {_first_line(e)}") from None
    return {n: TensorSpec(tuple(shapes[n]), dtypes[n].name) for n in sorted(shapes)}


def read_tensors(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads tensors (all by default); a truncated or corrupt data file raises."""
    prefix = resolve(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = sorted(reader.get_variable_to_shape_map()) if names is None else names
        return {n: reader.get_tensor(n) for n in names}
    except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: short data file.
        raise UnreadableCheckpointError(
            f"checkpoint {prefix} is corrupt or truncated: {_first_line(e)}"
        ) from None


def _first_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_files(prefix: str) -> None:
    for path in glob.glob(glob.escape(prefix) + ".*"):
        try:
            os.remove(path)
        except OSError:  # Already gone, or the file system refuses: the next save sweeps it.
            pass


def save(
    directory: str,
    tensors: Mapping[str, tf.Tensor | np.ndarray],
    step: int,
    keep: int = 5,
    basename: str = DEFAULT_BASENAME,
) -> str:
    """Atomically writes `tensors` as checkpoint `directory/basename-step`; keeps the last `keep`.

    Returns:
      The checkpoint prefix.

    Raises:
      CheckpointError: if writing fails (e.g. disk full); the previous checkpoint stays.
      ValueError: if there is nothing to save or `step` already has a checkpoint.
    """
    if not tensors:
        raise ValueError("refusing to save a checkpoint with no tensors")
    prefix = os.path.join(directory, f"{basename}-{int(step)}")
    if _prefix_exists(prefix):
        # Swapping files of a live checkpoint cannot be atomic; steps only move forward.
        raise ValueError(f"checkpoint {prefix} already exists; save each step once")
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    names = sorted(tensors)
    try:
        os.makedirs(directory, exist_ok=True)
        tf.raw_ops.SaveV2(
            prefix=tmp_prefix,
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=[tf.convert_to_tensor(tensors[n]) for n in names],
        )
        data_files = glob.glob(glob.escape(tmp_prefix) + ".data-*")
        for path in data_files + [tmp_prefix + ".index"]:
            _fsync(path)
        for path in data_files:
            os.replace(path, prefix + path[len(tmp_prefix) :])
        os.replace(tmp_prefix + ".index", prefix + ".index")
        _fsync(directory)
    except (tf.errors.OpError, OSError) as e:
        _remove_files(tmp_prefix)
        raise CheckpointError(f"could not write checkpoint {prefix}: {_first_line(e)}") from None
    try:
        kept = _update_state(directory, prefix, keep, basename)
        _remove_stale(directory, basename, kept)
    except OSError as e:  # The checkpoint itself is complete: `latest` finds it by its step.
        raise CheckpointError(f"wrote checkpoint {prefix} but could not update the '{STATE_FILE}' file "
                              f"or remove old checkpoints in {directory}: {_first_line(e)}") from None
    return prefix


def _update_state(directory: str, prefix: str, keep: int, basename: str) -> list[str]:
    """Points the state file at `prefix`; returns the prefixes to keep, oldest first."""
    existing = [p for p in _numbered_prefixes(directory, basename) if p != prefix]
    kept = (existing + [prefix])[-max(1, keep) :]
    # TF's CheckpointState text proto, as tf.train.latest_checkpoint reads it.
    lines = [f"model_checkpoint_path: {json.dumps(os.path.basename(prefix))}"]
    lines += [f"all_model_checkpoint_paths: {json.dumps(os.path.basename(p))}" for p in kept]
    write_atomically(os.path.join(directory, STATE_FILE), lambda path: _write_text(path, "\n".join(lines) + "\n"))
    return kept


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _numbered_prefixes(directory: str, basename: str) -> list[str]:
    """Complete `basename-N` prefixes in `directory`, by increasing N."""
    found = []
    for index in glob.glob(os.path.join(glob.escape(directory), f"{basename}-*.index")):
        match = re.fullmatch(re.escape(basename) + r"-(\d+)\.index", os.path.basename(index))
        if match:
            found.append((int(match.group(1)), index[: -len(".index")]))
    return [p for _, p in sorted(found)]


def _remove_stale(directory: str, basename: str, kept: list[str]) -> None:
    """Deletes older checkpoints and the temporaries of killed saves (ours and SaveV2's)."""
    keep = {os.path.basename(p) for p in kept}
    numbered = re.compile(re.escape(basename) + r"-\d+(?=\.)")
    for name in os.listdir(directory):
        found = numbered.match(name)
        temporary = ".tmp" in name or ".tempstate" in name
        if (found and (temporary or found.group(0) not in keep)) or _STATE_TEMPORARY.fullmatch(name):
            os.remove(os.path.join(directory, name))


@dataclasses.dataclass
class RestoreReport:
    """What a name-based restore matched; see `match`."""

    checkpoint: str
    matched: list[str]
    missing_in_checkpoint: list[str]
    unused_in_checkpoint: list[str]
    mismatched: list[tuple[str, TensorSpec, TensorSpec]]  # (name, in model, in checkpoint)
    excluded: list[str]

    def format(self, verbose: bool = False) -> str:
        """A count line, then the missing, unused and mismatched names (the first 10 of
        each unless `verbose`), for logs and `print`."""
        lines = [
            f"restore from {self.checkpoint}: {len(self.matched)} matched, "
            f"{len(self.missing_in_checkpoint)} missing in checkpoint, "
            f"{len(self.unused_in_checkpoint)} unused in checkpoint, "
            f"{len(self.mismatched)} shape/dtype mismatch, {len(self.excluded)} excluded"
        ]
        limit = None if verbose else 10
        sections = [
            ("missing in checkpoint (left at their initial values)", self.missing_in_checkpoint),
            ("unused in checkpoint", self.unused_in_checkpoint),
            ("shape/dtype mismatch (model vs checkpoint)",
             [f"{n}: {a} vs {b}" for n, a, b in self.mismatched]),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title}:")
                lines += [f"    {item}" for item in items[:limit]]
                if limit is not None and len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)

    def require(self, scopes: Iterable[str]) -> None:
        """Raises CheckpointError unless every wanted variable under `scopes` matched.

        Also raises when nothing matched at all, which is what a wrong checkpoint (or
        the released README snippet on Python 3) silently does.
        """
        scopes = tuple(scopes)
        failed = [n for n in self.missing_in_checkpoint if n.startswith(scopes)]
        failed += [n for n, _, _ in self.mismatched if n.startswith(scopes)]
        if failed:
            raise CheckpointError(
                f"checkpoint {self.checkpoint} lacks {len(failed)} required variable(s) "
                f"under {', '.join(scopes)} (missing or wrong shape), e.g. "
                + ", ".join(sorted(failed)[:3])
            )
        if not self.matched:
            raise CheckpointError(
                f"no variable of the model matched checkpoint {self.checkpoint}"
            )


def match(
    wanted: Mapping[str, TensorSpec],
    path: str,
    exclude_scopes: Iterable[str] = (),
) -> RestoreReport:
    """Compares model variables (name -> spec) with a checkpoint by name, shape and dtype."""
    prefix = resolve(path)
    available = read_specs(prefix)
    exclude_scopes = tuple(exclude_scopes)
    excluded = sorted(n for n in wanted if exclude_scopes and n.startswith(exclude_scopes))
    candidates = [n for n in sorted(wanted) if n not in excluded]
    mismatched = [
        (n, wanted[n], available[n])
        for n in candidates
        if n in available and wanted[n] != available[n]
    ]
    bad = {n for n, _, _ in mismatched}
    return RestoreReport(
        checkpoint=prefix,
        matched=[n for n in candidates if n in available and n not in bad],
        missing_in_checkpoint=[n for n in candidates if n not in available],
        unused_in_checkpoint=[n for n in available if n not in wanted],
        mismatched=mismatched,
        excluded=excluded,
    )


def spec_of(variable: tf.Variable) -> TensorSpec:
    """The shape and dtype a checkpoint tensor needs to restore `variable` (TF1 or TF2)."""
    return TensorSpec(tuple(variable.shape.as_list()), variable.dtype.base_dtype.name)


def restore_variables(
    variables: Mapping[str, tf.Variable],
    path: str,
    exclude_scopes: Iterable[str] = (),
    required_scopes: Iterable[str] = (),
) -> RestoreReport:
    """Assigns checkpoint values to TF2 variables with the same name, shape and dtype.

    Args:
      variables: slim name -> variable (plain, mirrored or sync-on-read).
      path: checkpoint prefix, file or directory (its latest checkpoint).
      exclude_scopes: name prefixes never restored.
      required_scopes: name prefixes that must all match (see RestoreReport.require);
        checked before anything is assigned.

    Returns:
      The RestoreReport.
    """
    report = match({n: spec_of(v) for n, v in variables.items()}, path, exclude_scopes)
    report.require(required_scopes)
    values = read_tensors(report.checkpoint, report.matched)
    for name in report.matched:
        variables[name].assign(values[name])
    return report
