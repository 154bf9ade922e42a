"""Per-example seeds for tasks' input pipelines.

A task draws every random choice of an example from that example's own stateless seed, so
an example is a pure function of (its image, the pipeline's seed, its index in the
stream): the same in every run, on every worker and in every parallel map, whatever order
tf.data computes the elements in. Each random choice takes its own seed split from it:

    def make_dataset(self, source, batch_size, seed):
        examples = seeds.map_with_seeds(source, self.make_example, seed)
        return examples.batch(batch_size, drop_remainder=True)

    def make_example(self, image, seed):
        crop_seed, flip_seed = seeds.split(seed, 2)
        crop = tf.image.stateless_random_crop(image, [64, 64, 3], crop_seed)
        return {"image": tf.image.stateless_random_flip_left_right(crop, flip_seed)}

The pipeline's seed may be a Python int or, under --strategy parameter_server, a scalar
int64 tensor each worker draws for itself (`Task.make_dataset`); both work here.
"""

from typing import Callable

from mtss_train.compat import tf


def example_seed(seed: int | tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """The stateless seed [2] int64 of the example at `index` (int64) of a pipeline seeded
    with `seed`."""
    return tf.stack([tf.cast(seed, tf.int64), index])


def map_with_seeds(dataset: tf.data.Dataset, fn: Callable[..., object], seed: int | tf.Tensor) -> tf.data.Dataset:
    """`dataset` mapped by `fn(element, example seed)`, in parallel (AUTOTUNE), the order kept;
    the n-th element's seed is `example_seed(seed, n)`."""
    numbered = tf.data.Dataset.zip(dataset, tf.data.Dataset.counter())
    return numbered.map(lambda element, index: fn(element, example_seed(seed, index)),
                        num_parallel_calls=tf.data.AUTOTUNE)


def split(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    """`count` independent stateless seeds [2] drawn from `seed` [2], one per random choice."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))
