"""Each task's raw input and its distributed batches.

A task reads the shared photos (`--data`, source kind "images") unless it reads its own
kind of data; either way `--task_param TASK.data=PATH` gives it its own path. Tasks of one
kind and path share one Source, so a bad file is counted once however many tasks read it.
"""

from typing import Iterator, Sequence

from mtss_train.compat import tf
from mtss_train.data.images import ReadOptions, read_options
from mtss_train.data.source import Source
from mtss_train.errors import MtssError
from mtss_train.task import Task

SHARED_KIND = "images"


def open_sources(tasks: Sequence[Task], shared_path: str | None, eval_split: bool = False,
                 options: ReadOptions | None = None) -> dict[str, Source]:
    """Task name -> its Source. With `eval_split`, the tasks' held-out sources instead:
    `TASK.eval_data`, else `shared_path` for tasks of the shared kind; tasks with neither
    are left out (they are not evaluated). `options` (TFRecord image key, pixel limit)
    apply to the photos sources the tasks open."""
    with read_options(options or ReadOptions()):
        return _open_sources(tasks, shared_path, eval_split)


def _open_sources(tasks: Sequence[Task], shared_path: str | None, eval_split: bool) -> dict[str, Source]:
    opened: dict[tuple[str, str | None], Source] = {}
    sources = {}
    for task in tasks:
        own = task.config.eval_data if eval_split else task.config.data
        path = own or (shared_path if task.source_kind == SHARED_KIND else None)
        if eval_split and path is None:
            continue
        key = (task.source_kind, path)
        if key not in opened:
            opened[key] = task.open_source(path)
        task.check_source(opened[key], path)
        sources[task.name] = opened[key]
    return sources


def skipped_inputs(sources: dict[str, Source]) -> int:
    """Bad inputs met so far in these sources, each source counted once."""
    return sum(source.skipped.count for source in {id(s): s for s in sources.values()}.values())


def check_batch_sizes(tasks: Sequence[Task], replicas: int) -> None:
    """Each task's global batch must split evenly over the replicas."""
    for task in tasks:
        if task.config.batch_size % replicas:
            raise MtssError(
                f"{task.name}.batch_size {task.config.batch_size} does not split over {replicas} replicas; "
                f"use a multiple of {replicas} (--task_param {task.name}.batch_size=N)"
            )


def distributed_dataset(strategy: tf.distribute.Strategy, task: Task, source: Source, seed: int):
    """The task's batches, each input pipeline reading its own shard of the source."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        shard = (context.num_input_pipelines, context.input_pipeline_id)
        batch = context.get_per_replica_batch_size(task.config.batch_size)
        return task.make_dataset(source.dataset(seed, shard), batch, seed)

    return strategy.distribute_datasets_from_function(dataset_fn)


def iterators(strategy: tf.distribute.Strategy, tasks: Sequence[Task], sources: dict[str, Source],
              seed: int) -> dict[str, Iterator]:
    """One endless batch iterator per task; each task's randomness has its own seed."""
    return {
        task.name: iter(distributed_dataset(strategy, task, sources[task.name], seed + 1009 * i))
        for i, task in enumerate(tasks)
    }
