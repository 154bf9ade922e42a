"""The shared ends of the Beam data-preparation pipelines: listing inputs, writing shards, commit.

Both pipelines (`prepare_images`, `prepare_masks`) work the same way around their own
per-input function:

1. The driver lists the inputs (tf.io.gfile, so cloud storage works where TF supports it)
   and writes the list in chunks of `LISTING_CHUNK` paths into a run directory
   OUTPUT/.prepare-<run>/. The pipeline starts from the chunk names, so a million inputs
   do not bloat the job graph (Dataflow refuses graphs over 10 MB).
2. Every record gets a digest (of its pixels for images; of video id and frame number for
   masks); shard = digest % N, and a shard's records are written in digest order. The
   output depends only on the inputs and settings, not on the runner, the worker count
   or the listing order.
3. Each shard is written by one worker into the run directory under a name no reader
   matches (`*.partial`); a retried or speculative attempt writes its own file and the
   last rename wins (all attempts hold the same bytes).
4. A final step moves the shards into OUTPUT, deletes shards of an earlier run with
   another shard count, writes OUTPUT/manifest.json last and removes the run directory.
   A run killed before that leaves the earlier output as it was.

One run per OUTPUT at a time: a new run deletes run directories that killed runs left.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from mtss_train.compat import tf
from mtss_train.data.files import temporary_name, walk_files
from mtss_train.errors import DataError, MtssError
from mtss_train.log_levels import quieted

try:
    # Beam's BigQuery module warns on import, on the root logger, that an optional Google
    # client is missing; nothing here uses BigQuery, so the line would only mislead.
    with quieted("", "ERROR"):
        import apache_beam as beam  # Re-exported for the pipeline modules.
except ImportError as e:
    raise MtssError("data preparation needs Apache Beam: pip install 'mtss-train[beam]' "
                    "(or, in a clone, pip install -e '.[beam]')") from e

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RUN_PREFIX = ".prepare-"
LISTING_CHUNK = 1000
WILDCARDS = "*?["


def is_local(path: str) -> bool:
    """Whether `path` is on the local filesystem (not a URL such as gs://...)."""
    return "://" not in path


def list_inputs(pattern: str, extensions: tuple[str, ...], what: str) -> tuple[str, list[str]]:
    """(root, sorted paths) of the inputs `pattern` names.

    A directory is searched recursively for files ending in `extensions` (any case; hidden
    files are left out); anything else is a glob, whose matches are all taken (the user
    named them). `root` is the directory names are made relative to: the directory, or the
    glob's longest directory prefix without a wildcard.

    Raises:
      DataError: if nothing matches, naming `pattern` and `what` was looked for.
    """
    try:
        if tf.io.gfile.isdir(pattern):
            root = pattern.rstrip("/") or "/"
            if is_local(root):
                files = walk_files(root)
            else:
                files = [os.path.join(d, n) for d, _, names in tf.io.gfile.walk(root) for n in names]
            paths = sorted(p for p in files if p.lower().endswith(extensions)
                           and not os.path.basename(p).startswith("."))
        else:
            first = min([pattern.index(c) for c in WILDCARDS if c in pattern], default=len(pattern))
            root = os.path.dirname(pattern[:first]) or "."
            paths = sorted(tf.io.gfile.glob(pattern))
    except tf.errors.OpError as e:
        raise DataError(f"cannot list {pattern}: {e.message}") from e
    if not paths:
        raise DataError(f"no {what} match {pattern} (a glob, or a directory searched for "
                        f"{', '.join(extensions)})")
    return root, paths


def start_run(output: str, kind: str) -> str:
    """Creates OUTPUT and a fresh run directory in it; returns the run directory.

    Raises:
      MtssError: if OUTPUT holds another kind of prepared data, or cannot be written.
    """
    manifest = os.path.join(output, MANIFEST)
    try:
        if tf.io.gfile.exists(manifest):
            previous = read_manifest(output).get("kind")
            if previous != kind:
                what = f"prepared {previous}" if previous else "another program's output"
                raise MtssError(f"{output} holds {what} ({MANIFEST}), not prepared {kind}; use another --output")
        tf.io.gfile.makedirs(output)
        for stale in tf.io.gfile.glob(os.path.join(output, RUN_PREFIX + "*")):
            tf.io.gfile.rmtree(stale)  # Left by a killed run.
        run = os.path.join(output, RUN_PREFIX + uuid.uuid4().hex[:12])
        tf.io.gfile.makedirs(run)
    except tf.errors.OpError as e:
        raise MtssError(f"cannot write the output directory {output}: {e.message}") from e
    return run


def write_listing(paths: list[str], run: str) -> list[str]:
    """Writes `paths` as JSON lines in chunks of LISTING_CHUNK into `run`; the chunk files."""
    chunks = []
    for start in range(0, len(paths), LISTING_CHUNK):
        chunk = os.path.join(run, f"inputs-{start // LISTING_CHUNK:06d}.jsonl")
        with tf.io.gfile.GFile(chunk, "w") as f:
            f.write("".join(json.dumps(p) + "\n" for p in paths[start:start + LISTING_CHUNK]))
        chunks.append(chunk)
    return chunks


def read_listing(chunk: str) -> Iterator[str]:
    """The paths of one chunk written by `write_listing`."""
    with tf.io.gfile.GFile(chunk) as f:
        for line in f:
            yield json.loads(line)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run ready to start: its inputs are listed (in `chunks`) and its run directory exists.

    Attributes:
      kind: 'images' or 'masks' (a manifest of one kind is never overwritten by the other).
      pattern, root: what the user gave, and the directory input names are relative to.
      listed: how many inputs were listed.
      output, run: the output directory and this run's directory in it.
      chunks: the listing's chunk files.
      shards: the number of output shards.
      settings: the settings that decide the output (JSON-able), for the manifest.
    """

    kind: str
    pattern: str
    root: str
    listed: int
    output: str
    run: str
    chunks: tuple[str, ...]
    shards: int
    settings: dict


def make_plan(kind: str, pattern: str, extensions: tuple[str, ...], output: str, shards: int, settings: dict,
         check: Callable[[str, list[str]], None] | None = None) -> Plan:
    """Lists the inputs, runs `check(root, paths)` on them, and starts the run in `output`.

    Raises:
      DataError: if nothing matches `pattern` (or from `check`).
      MtssError: if `shards` is out of range, or as `start_run`.
    """
    if not 1 <= shards <= 99_999:
        raise MtssError(f"--shards must be in [1, 99999], not {shards}")
    root, paths = list_inputs(pattern, extensions, kind)
    if check:
        check(root, paths)
    run = start_run(output, kind)
    return Plan(kind, pattern, root, len(paths), output, run, tuple(write_listing(paths, run)), shards, settings)


def listed(pipeline: beam.Pipeline, plan: Plan) -> beam.PCollection:
    """The listed paths as a PCollection, spread over workers (one element each)."""
    return (pipeline
            | "Listing" >> beam.Create(plan.chunks)
            | "ReadListing" >> beam.FlatMap(read_listing)
            # Without this, a runner may keep a chunk's paths in one bundle on one worker.
            | "Spread" >> beam.Reshuffle())


def digest(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def shard_of(hex_digest: str, shards: int) -> int:
    """The shard a record with this digest goes to (stable across runs and machines)."""
    return int(hex_digest[:16], 16) % shards


def shard_name(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{shards:05d}.tfrecord"


def example(features: dict[str, bytes | str | int]) -> bytes:
    """A serialized tf.train.Example of bytes/str (bytes_list) and int (int64_list) features."""
    feature = {}
    for key, value in features.items():
        if isinstance(value, int):
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        else:
            value = value.encode() if isinstance(value, str) else value
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    # Deterministic: the features map would otherwise serialize in an unspecified order.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


Result = TypeVar("Result")


def write_then_rename(path: str, write: Callable[[str], Result]) -> Result:
    """`data.files.write_atomically` for tf.io.gfile paths, cloud storage included: `write`
    writes `temporary_name(path)` (and returns what it likes), which is then renamed over
    `path`; the temporary file is removed if either fails.

    A runner may run a step more than once, even at the same time (a retry, a speculative
    copy, a worker that lost its lease but not its process), so every attempt writes a file
    of its own: attempts sharing one temporary name could interleave into a file none of
    them wrote. All attempts write the same bytes, so the last rename wins harmlessly.
    Nothing is fsynced: gfile cannot, and a cloud object is whole once closed.
    """
    temporary = temporary_name(path)
    try:
        result = write(temporary)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except BaseException:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.remove(temporary)
        raise
    return result


def write_shard(records: Iterable[bytes], run: str, name: str) -> dict:
    """Writes serialized records to RUN/NAME.partial (`write_then_rename`); its stats."""
    final = os.path.join(run, name + ".partial")

    def write(temporary: str) -> int:
        count = 0
        with tf.io.TFRecordWriter(temporary) as writer:
            for record in records:
                writer.write(record)
                count += 1
        return count

    count = write_then_rename(final, write)
    return {"file": name, "records": count, "bytes": tf.io.gfile.stat(final).length}


def read_manifest(output: str) -> dict:
    """OUTPUT/manifest.json.

    Raises:
      MtssError: if it is missing or unreadable.
    """
    path = os.path.join(output, MANIFEST)
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (tf.errors.OpError, ValueError) as e:
        raise MtssError(f"cannot read {path}: {e}") from e


def _write_json(path: str, value: dict) -> None:
    """Writes JSON to a gfile path atomically (`write_then_rename`)."""

    def write(temporary: str) -> None:
        with tf.io.gfile.GFile(temporary, "w") as f:
            json.dump(value, f, indent=1)

    write_then_rename(path, write)


def run_pipeline(plan: Plan, options: "beam.options.pipeline_options.PipelineOptions", per_input: Callable,
                 per_shard: Callable, commit_fn: Callable, details_tag: str, settings: object) -> dict:
    """Runs the pipeline every preparation shares to the end; returns the manifest.

    The listed inputs go to `per_input(path, plan.root, settings, plan.shards)`, which
    yields (shard index, item) pairs and, tagged `details_tag`, what it has to say of the
    input; each shard's items go to `per_shard((index, items), plan.run, plan.shards)`,
    which writes the shard and returns its `write_shard` stats; then, once, after every
    shard, `commit_fn(None, stats list, details list, plan)` (it waits for both side inputs).
    """
    with beam.Pipeline(options=options) as pipeline:
        outputs = (listed(pipeline, plan)
                   | "PerInput" >> beam.FlatMap(per_input, plan.root, settings, plan.shards).with_outputs(
                       details_tag, main="items"))
        written = (outputs.items
                   | "ByShard" >> beam.GroupByKey()
                   | "Write" >> beam.Map(per_shard, plan.run, plan.shards))
        (pipeline
         | "Commit" >> beam.Create([None])
         | "MoveAndManifest" >> beam.Map(commit_fn, beam.pvalue.AsList(written),
                                         beam.pvalue.AsList(outputs[details_tag]), plan))
    return read_manifest(plan.output)


def commit(plan: Plan, prefix: str, written: list[dict], manifest: dict) -> None:
    """Moves the run's shards into OUTPUT and writes OUTPUT/manifest.json last.

    Idempotent, so a runner may retry it: a shard already moved is left in place. Shards no
    record hashed to are written empty, so OUTPUT always holds PREFIX-*-of-N for every index.

    Args:
      written: `write_shard` stats of the shards that got records (any order).
      manifest: the kind's summary and details; the header (version, kind, input, settings)
        and the shard table ('shards') are added.
    """
    output, run, shards = plan.output, plan.run, plan.shards
    by_name = {stats["file"]: stats for stats in written}
    table = []
    old_manifest = os.path.join(output, MANIFEST)
    if tf.io.gfile.exists(old_manifest):
        tf.io.gfile.remove(old_manifest)  # Readers of the manifest see no half-swapped output.
    for index in range(shards):
        name = shard_name(prefix, index, shards)
        target, partial = os.path.join(output, name), os.path.join(run, name + ".partial")
        if tf.io.gfile.exists(partial):
            tf.io.gfile.rename(partial, target, overwrite=True)
        elif name not in by_name:
            with tf.io.TFRecordWriter(target):
                pass  # An empty shard.
        stats = by_name.get(name, {"file": name, "records": 0, "bytes": 0})
        table.append({"file": name, "records": stats["records"], "bytes": stats["bytes"]})
    keep = {row["file"] for row in table}
    for path in tf.io.gfile.glob(os.path.join(output, f"{prefix}-*-of-*.tfrecord")):
        if os.path.basename(path) not in keep:
            tf.io.gfile.remove(path)  # An earlier run's shard with another shard count.
    header = {"version": MANIFEST_VERSION, "kind": plan.kind, "input": plan.pattern, "root": plan.root,
              "settings": plan.settings, "num_shards": shards}
    _write_json(old_manifest, {**header, **manifest, "shards": table})
    if tf.io.gfile.exists(run):
        tf.io.gfile.rmtree(run)
