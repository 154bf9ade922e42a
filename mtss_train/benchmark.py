"""Measures the trainer against its parts, as ratios within one run.

    python -m mtss_train.benchmark --tasks rp --trunk_size tiny --steps 30

For each task it times, on the same batch shapes:
  * input:   the task's tf.data pipeline alone (batches/s, nothing consumes them);
  * trunk:   forward + backward of the bare trunk on the task's trunk images;
  * step:    the trainer's full step (trunk + head + loss + optimizer) on a fixed batch;
  * trained: the trainer's step fed by its pipeline, as in `train()`.
and prints step/trunk (what the head, loss and optimizer cost on top of the trunk) and
input/trained (above 1: the pipeline outruns training; below 1: training waits for data),
plus the peak resident memory of the process.
"""

from mtss_train import cli  # noqa: F401  First: quiets TensorFlow's start-up logs.

import resource
import time
from typing import Callable, Iterator

from absl import app, flags

from mtss_train import trunk
from mtss_train.compat import tf
from mtss_train.config import TrainConfig
from mtss_train.errors import cli_main
from mtss_train.task import Batch, Task
from mtss_train.trainer import Trainer

_TASKS = flags.DEFINE_list("tasks", ["rp"], "Tasks to measure.")
_TRUNK_SIZE = flags.DEFINE_enum("trunk_size", "tiny", list(trunk.TRUNK_SIZES), "Trunk.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size of every task.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement (after 3 warm-up steps).", lower_bound=1)
_DATA = flags.DEFINE_string("data", None, "Images (default: the bundled sample photos).")

WARMUP_STEPS = 3


def steps_per_second(run_once: Callable[[], object], steps: int) -> float:
    for _ in range(WARMUP_STEPS):
        run_once()
    start = time.perf_counter()
    for _ in range(steps):
        result = run_once()
    tf.nest.map_structure(lambda t: t.numpy(), result)  # Waits for the last step's device work.
    return steps / (time.perf_counter() - start)


def measure_task(trainer: Trainer, task: Task, batch: Batch, iterator: Iterator, steps: int) -> dict[str, float]:
    """Batches/s of the task's input, bare trunk, trainer step, and step fed by `iterator`."""
    train_step = trainer.runner.train_step((task.name,))
    trunk_variables = trainer.model.trunk.trainable_variables

    @tf.function
    def bare_trunk() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            features, _ = trainer.model.features(task.name, batch, training=True)
            loss = tf.reduce_mean(features)
        return tape.gradient(loss, trunk_variables)

    source = trainer.sources[task.name].dataset(seed=1)
    pipeline = iter(task.make_dataset(source, task.config.batch_size, seed=1))
    return {
        "input": steps_per_second(lambda: next(pipeline), steps),
        "trunk": steps_per_second(bare_trunk, steps),
        "step": steps_per_second(lambda: train_step({task.name: batch}), steps),
        "trained": steps_per_second(lambda: train_step({task.name: next(iterator)}), steps),
    }


def main(argv: list[str]) -> None:
    del argv
    config = TrainConfig(
        train_dir="/nonexistent-benchmark-dir", tasks=_TASKS.value, data=_DATA.value,
        trunk_size=_TRUNK_SIZE.value,
        task_params={t: {"batch_size": str(_BATCH_SIZE.value)} for t in _TASKS.value},
    )
    trainer = Trainer(config)
    iterators = trainer.iterators(trainer.sources, seed=0)
    batches = {t.name: next(iterators[t.name]) for t in trainer.tasks}
    trainer.prepare(batches)
    print(f"trunk {config.trunk_size}, batch {_BATCH_SIZE.value}, {_STEPS.value} steps, "
          f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'} inter-op threads")
    for task in trainer.tasks:
        rates = measure_task(trainer, task, batches[task.name], iterators[task.name], _STEPS.value)
        print(f"{task.name}: " + "  ".join(f"{k} {v:.2f} batches/s" for k, v in rates.items()))
        print(f"{task.name}: step/trunk time {rates['trunk'] / rates['step']:.2f}x  "
              f"input/trained rate {rates['input'] / rates['trained']:.2f}x")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak_mib:.0f} MiB")


if __name__ == "__main__":
    app.run(cli_main(main))
