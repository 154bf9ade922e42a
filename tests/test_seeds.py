"""mtss_train.seeds: every example's randomness comes from its own seed, (pipeline seed, index)."""

import numpy as np

from mtss_train import seeds
from mtss_train.compat import tf


def noise(element: dict, seed: tf.Tensor) -> dict:
    """An element's value with a random draw from its seed beside it."""
    first, second = seeds.split(seed, 2)
    return {"value": element["value"], "seed": seed, "first": tf.random.stateless_uniform([3], first),
            "second": tf.random.stateless_uniform([3], second)}


def draws(seed: int | tf.Tensor, count: int = 40) -> list[dict]:
    elements = tf.data.Dataset.range(100, 100 + count).map(lambda v: {"value": v})
    return [{k: v.numpy() for k, v in e.items()} for e in seeds.map_with_seeds(elements, noise, seed)]


def test_each_element_gets_the_seed_of_its_index_in_order():
    found = draws(7)
    assert [e["value"] for e in found] == list(range(100, 140))  # The parallel map keeps the order.
    assert [e["seed"].tolist() for e in found] == [[7, i] for i in range(40)]
    for i in (0, 17, 39):  # What the pipeline computed is what one call on that seed gives.
        alone = noise({"value": tf.constant(0, tf.int64)}, seeds.example_seed(7, tf.constant(i, tf.int64)))
        np.testing.assert_array_equal(found[i]["first"], alone["first"].numpy())


def test_a_tensor_seed_as_parameter_server_workers_draw_it_gives_the_same_examples():
    by_int, by_tensor = draws(7), draws(tf.constant(7, tf.int64))
    for a, b in zip(by_int, by_tensor):
        np.testing.assert_array_equal(a["first"], b["first"])


def test_split_seeds_differ_from_each_other_across_examples_and_across_pipeline_seeds():
    found, other = draws(7), draws(8)
    values = [tuple(e[key]) for e in found for key in ("first", "second")] + [tuple(e["first"]) for e in other]
    assert len(set(values)) == len(values)
    assert all(seed.shape == (2,) for seed in seeds.split(tf.constant([1, 2], tf.int64), 5))
