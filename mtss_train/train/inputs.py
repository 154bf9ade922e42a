"""Each task's raw input and its distributed batches.

A task reads the shared photos (`--data`, source kind "images") unless it reads its own
kind of data; either way `--task_param TASK.data=PATH` gives it its own path. Tasks of one
kind and path share one Source, so a bad file is counted once however many tasks read it.
"""

from typing import Callable, Iterator, Sequence

from absl import logging

from mtss_train.compat import tf
from mtss_train.data.images import ReadOptions
from mtss_train.data.in_graph import calls_python
from mtss_train.data.source import Source, builds_remotely
from mtss_train.errors import MtssError
from mtss_train.task import Task

SHARED_KIND = "images"
DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def open_sources(tasks: Sequence[Task], shared_path: str | None, eval_split: bool = False,
                 options: ReadOptions = ReadOptions()) -> dict[str, Source]:
    """Task name -> its Source. With `eval_split`, the tasks' held-out sources instead:
    `TASK.eval_data`, else `shared_path` for tasks of the shared kind; tasks with neither
    are left out (they are not evaluated). `options` (TFRecord image key, pixel limit) say
    how the shared photos are read: tasks of that kind get them (`Task.open_source`)."""
    opened: dict[tuple[str, str | None], Source] = {}
    sources = {}
    for task in tasks:
        own = task.config.eval_data if eval_split else task.config.data
        path = own or (shared_path if task.source_kind == SHARED_KIND else None)
        if eval_split and path is None:
            continue
        key = (task.source_kind, path)
        if key not in opened:
            opened[key] = task.open_source(path, options) if task.source_kind == SHARED_KIND else task.open_source(path)
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


def task_seeds(tasks: Sequence[Task], seed: int) -> Iterator[tuple[Task, int]]:
    """(task, its seed): each task's randomness has its own."""
    return ((task, seed + 1009 * i) for i, task in enumerate(tasks))


def iterators(strategy: tf.distribute.Strategy, tasks: Sequence[Task], sources: dict[str, Source],
              seed: int) -> dict[str, Iterator]:
    """One endless batch iterator per task."""
    return {task.name: iter(distributed_dataset(strategy, task, sources[task.name], task_seed))
            for task, task_seed in task_seeds(tasks, seed)}


def local_iterators(tasks: Sequence[Task], sources: dict[str, Source], seed: int) -> dict[str, Iterator]:
    """One endless iterator of global batches per task, made in this process (no strategy)."""
    return {task.name: iter(task.make_dataset(sources[task.name].dataset(task_seed), task.config.batch_size, task_seed))
            for task, task_seed in task_seeds(tasks, seed)}


def per_worker_iterators(per_worker_iterator: Callable[[DatasetFn], object], tasks: Sequence[Task],
                         sources: dict[str, Source], seed: int) -> dict[str, object]:
    """One iterator per task over datasets that each parameter-server worker builds and
    reads itself; `per_worker_iterator` makes it from a dataset_fn (the step runner's)."""
    iterators = {}
    for task, task_seed in task_seeds(tasks, seed):
        source = sources[task.name]
        remote = builds_remotely(source)
        if calls_python(task.make_dataset(source.dataset(task_seed), task.config.batch_size, task_seed)):
            logging.warning(
                "the input pipeline of task %s calls Python (tf.numpy_function or tf.py_function, in its make_dataset "
                "or in the dataset() of its source %s): under --strategy parameter_server that Python runs in the "
                "coordinator, which then prepares every worker's batches", task.name, type(source).__name__)

        def dataset_fn(context: tf.distribute.InputContext, task: Task = task, source: Source = source,
                       task_seed: int = task_seed, remote: bool = remote) -> tf.data.Dataset:
            # Every worker runs this one traced function: its clock gives it its own order and
            # augmentation. A source that does not build remotely gets the int it was promised.
            worker_seed = task_seed + tf.cast(tf.timestamp() * 1e6, tf.int64) % 2**31
            batch = context.get_per_replica_batch_size(task.config.batch_size)
            return task.make_dataset(source.dataset(worker_seed if remote else task_seed), batch, worker_seed)

        iterators[task.name] = per_worker_iterator(dataset_fn)
    return iterators
