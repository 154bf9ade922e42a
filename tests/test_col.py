"""Colorization: the ab bins, soft encoding, rebalancing, decoding, the pipeline's grey
handling, the loss by hand, the prior of the training data and its cache, the prior command,
and a short training run (col beside the other tasks: test_multitask)."""

import glob
import hashlib
import logging
import os

import cv2
import numpy as np
import pytest
import skimage.color
import skimage.data
from absl import flags

from conftest import assert_one_line_error, run_cli
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig, build_tasks
from mtss_train.data.images import image_source
from mtss_train.errors import DataError, MtssError
from mtss_train.task import MIN_IMAGE_SIDE, make_config, task_class
from mtss_train.tasks import col_encoding as encoding
from mtss_train.tasks import col_prior
from mtss_train.tasks.col import Colorization
from mtss_train.tasks.col_prior import load_prior
from mtss_train.train.trainer import Trainer
from test_settings import parse

SMALL = {"crop": "64", "resize_side": "80", "head_width": "16", "prior": "uniform"}
# The CLI names col by import path until mtss_train.tasks registers it by name.
COL = "col"


def col_task(**overrides: str) -> Colorization:
    return Colorization(make_config(Colorization, {**SMALL, **overrides}))


def photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)


def brute_force_encoding(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 5 nearest bins of each ab [P, 2] and their normalised Gaussian weights (sigma 5)."""
    distance = np.linalg.norm(ab[:, None] - encoding.ab_bins()[None], axis=-1)
    nearest = np.argsort(distance, axis=1)[:, :5]
    weights = np.exp(-np.take_along_axis(distance, nearest, 1) ** 2 / 50.0)
    return nearest, weights / weights.sum(1, keepdims=True)


# -- bins, encoding, rebalancing, decoding ----------------------------------------------------

def test_the_gamut_rule_gives_313_bins_on_the_10_unit_grid():
    bins = encoding.ab_bins()
    assert bins.shape == (313, 2) and encoding.NUM_BINS == 313
    assert np.all(bins % 10 == 0) and len({tuple(b) for b in bins}) == 313
    assert [0, 0] in bins.tolist()
    # The count is not on a knife edge of the radius, and the rule does depend on it.
    assert len(encoding.ab_bins(13.35)) == len(encoding.ab_bins(13.65)) == 313
    assert len(encoding.ab_bins(10.0)) < 300


# Zhang et al.'s bins, richzhang/colorization resources/pts_in_hull.npy ([313, 2] int64, a-major),
# read from two independent copies that agree (see col_encoding): the sha256 of its bytes,
# and the bins where the gamut rule differs from it.
ZHANG_BINS_SHA256 = "2a39983ed60d5b52b717842d56d5f766982289e6d5a609582155f437cecc1045"
ONLY_ZHANG = {(-30, -50), (40, 90), (100, -90), (100, 0)}
ONLY_OURS = {(-60, 100), (80, -120), (80, 80), (110, -60)}


def test_the_gamut_rule_shares_309_of_zhangs_313_bins():
    ours = {tuple(int(v) for v in b) for b in encoding.ab_bins()}
    assert ONLY_OURS <= ours and not ONLY_ZHANG & ours
    zhang = np.array(sorted((ours - ONLY_OURS) | ONLY_ZHANG), np.int64)
    assert zhang.shape == (313, 2)
    assert hashlib.sha256(zhang.tobytes()).hexdigest() == ZHANG_BINS_SHA256


@pytest.mark.slow
def test_every_srgb_colour_falls_in_the_cell_of_a_bin_and_no_bin_is_far_from_the_gamut():
    colours = np.random.RandomState(0).randint(0, 256, [20000, 3]).astype(np.uint8)
    ab = skimage.color.rgb2lab(colours[None])[0, :, 1:]
    bins = {tuple(b) for b in encoding.ab_bins().tolist()}
    assert {tuple(c) for c in (np.round(ab / 10) * 10).tolist()} <= bins
    surface = encoding.srgb_surface_ab()
    far = [b for b in encoding.ab_bins() if np.linalg.norm(surface - b, axis=1).min() > 13.6]
    assert not far


def test_soft_encoding_rows_sum_to_one_and_lead_with_the_nearest_bin():
    ab = np.random.RandomState(1).uniform(-110, 110, [3000, 2]).astype(np.float32)
    bins, weights = (t.numpy() for t in encoding.soft_encode(ab))
    assert bins.shape == weights.shape == (3000, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.argmax(weights, -1) == 0) and np.all(np.diff(weights, axis=-1) <= 1e-7)
    # The table encodes the centre of the unit square holding ab: exactly the brute-force
    # encoding of that point...
    expected_bins, expected_weights = brute_force_encoding(np.floor(ab).astype(np.float64) + 0.5)
    np.testing.assert_array_equal(bins, expected_bins)
    np.testing.assert_allclose(weights, expected_weights, atol=1e-5)
    # ...so its first bin is at most twice the half diagonal (2 x 0.71) farther than the
    # nearest bin of the exact ab, and is that bin for nearly every ab.
    exact = np.linalg.norm(ab[:, None] - encoding.ab_bins()[None], axis=-1)
    chosen = np.take_along_axis(exact, bins[:, :1], 1)[:, 0]
    assert np.all(chosen <= exact.min(1) + 1.42)
    assert np.mean(bins[:, 0] == exact.argmin(1)) > 0.9


def test_soft_encoding_of_a_bin_centre_peaks_there():
    centres = encoding.ab_bins()[[0, 100, 200, 312]]
    bins, weights = encoding.soft_encode(centres)
    np.testing.assert_array_equal(bins.numpy()[:, 0], [0, 100, 200, 312])
    assert np.all(weights.numpy()[:, 0] > 0.5)


def test_rebalancing_weights_average_one_under_the_prior_and_favour_rare_colours():
    prior = np.random.RandomState(2).gamma(0.3, size=313)
    weights = encoding.rebalancing_weights(prior)
    smoothed = encoding.smoothed(prior)
    np.testing.assert_allclose(smoothed.sum(), 1.0)
    np.testing.assert_allclose(smoothed @ weights, 1.0, rtol=1e-5)
    order = np.argsort(smoothed)
    assert np.all(np.diff(weights[order]) <= 1e-6)  # Rarer (smoothed) bins weigh more.
    # w is inversely proportional to the prior mixed half and half with uniform...
    mixed = 0.5 * smoothed + 0.5 / 313
    np.testing.assert_allclose(weights * mixed, (weights * mixed)[0], rtol=1e-5)
    # ...so lambda = 1 ignores the prior.
    np.testing.assert_allclose(encoding.rebalancing_weights(prior, lam=1.0), 1.0, rtol=1e-5)


def test_annealed_mean_goes_from_the_mean_to_the_mode():
    logits = np.zeros([2, 313], np.float32)
    logits[1, 42] = 3.0
    mean = encoding.annealed_mean(logits, temperature=1.0).numpy()
    np.testing.assert_allclose(mean[0], encoding.ab_bins().mean(0), atol=1e-3)
    sharp = encoding.annealed_mean(logits, temperature=0.05).numpy()
    np.testing.assert_allclose(sharp[1], encoding.ab_bins()[42], atol=1e-3)
    default = encoding.annealed_mean(logits).numpy()[1]  # T = 0.38: between the two.
    assert 0 < np.linalg.norm(default - encoding.ab_bins()[42]) < np.linalg.norm(mean[1] - encoding.ab_bins()[42])


def test_bin_histogram_counts_nearest_bins_where_masked():
    ab = np.array([[0.4, 0.2], [0.0, 0.0], [31.0, -19.0], [50.0, 50.0]], np.float32)
    counts = encoding.bin_histogram(ab, np.array([1, 1, 1, 0])).numpy()
    index = {tuple(b): i for i, b in enumerate(encoding.ab_bins().tolist())}
    assert counts.sum() == 3 and counts[index[(0.0, 0.0)]] == 2 and counts[index[(30.0, -20.0)]] == 1


# -- examples, grey handling, loss ----------------------------------------------------------

def test_example_keeps_the_ab_of_every_4th_pixel_and_the_peak_chroma_of_8_px_cells():
    task = col_task()
    example = task.make_example(tf.constant(photo("coffee")), tf.constant([0, 3], tf.int64))
    crop = example["image"].numpy()
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    ab = skimage.color.rgb2lab(crop)[..., 1:]
    cells = ab.reshape(8, 8, 8, 8, 2)
    np.testing.assert_allclose(example["ab"].numpy(), ab[::4, ::4], atol=0.05)
    np.testing.assert_allclose(example["chroma"].numpy(), np.linalg.norm(cells, axis=-1).max(axis=(1, 3)), atol=0.05)
    assert float(example["colour_fraction"]) == 1.0
    grey = task.make_example(tf.constant(photo("camera")), tf.constant([0, 3], tf.int64))
    assert float(grey["colour_fraction"]) == 0.0 and float(tf.reduce_max(grey["chroma"])) < 1e-3


def test_crops_take_every_position_alike_and_half_are_mirrored():
    # Columns numbered by their value: a crop's smallest value tells where it was cut from.
    image = np.repeat(np.tile(np.arange(0, 192, 2, dtype=np.uint8), (64, 1))[..., None], 3, -1)  # 64 x 96.
    task = col_task(resize_side="64")  # The crop spans the height: 33 places along the width.
    examples = task._examples(tf.data.Dataset.from_tensors(image).repeat(660), seed=0)
    crops = np.stack([e["image"][0, :, 0] for e in examples.as_numpy_iterator()]).astype(int)
    assert crops.shape == (660, 64)
    counts = np.bincount(crops.min(1) // 2, minlength=33)
    assert len(counts) == 33 and counts.min() >= 5 and counts.max() <= 40, counts  # 20 each on average.
    mirrored = crops[:, 0] > crops[:, -1]
    assert np.all(np.abs(np.diff(crops, axis=1)) == 2)  # Whole columns, one step apart: no resampling.
    assert 0.4 < mirrored.mean() < 0.6


def test_grey_regions_are_masked_at_the_head_resolution():
    image = photo("chelsea")[:200, :200].copy()
    # Grey from column 88 on: 28.2 px of the 64 px crop, so the cells of 16 px from 32 on
    # are grey, with margin for the resize's blur.
    image[:, 88:] = image[:, 88:].mean(-1, keepdims=True).astype(np.uint8)
    task = col_task(resize_side="64")  # The crop is the whole image, scaled to 64 px.
    example = task.make_example(tf.constant(image), tf.constant([0, 0], tf.int64))
    batch = {k: v[None] for k, v in example.items()}
    _, colour = task.targets(batch, (4, 4))
    flipped = bool(example["image"].numpy()[:, :8].std(-1).max() < 1)  # The flip may swap halves.
    expected = np.repeat([[0, 0, 1, 1] if flipped else [1, 1, 0, 0]], 4, axis=0)
    np.testing.assert_array_equal(colour.numpy()[0], expected)


def random_batch(task: Colorization, size: int = 3) -> dict:
    images = [photo("astronaut"), photo("coffee"), photo("camera")][:size]
    examples = [task.make_example(tf.constant(im), tf.constant([5, i], tf.int64)) for i, im in enumerate(images)]
    return {k: tf.stack([e[k] for e in examples]) for k in examples[0] if k != "colour_fraction"}


def test_targets_are_the_centre_pixels_of_the_head_cells_at_every_stride():
    task = col_task()
    example = task.make_example(tf.constant(photo("astronaut")), tf.constant([0, 1], tf.int64))
    ab = skimage.color.rgb2lab(example["image"].numpy())[..., 1:]
    batch = {k: v[None] for k, v in example.items()}
    for side in (8, 16, 32):  # Output strides: cells of `side` px, their centres at side * i + side / 2.
        targets, _ = task.targets(batch, (64 // side, 64 // side))
        np.testing.assert_allclose(targets.numpy()[0], ab[side // 2::side, side // 2::side], atol=0.05)


def test_loss_and_metrics_by_hand(tmp_path):
    prior = np.random.RandomState(4).gamma(0.3, size=313)
    np.save(tmp_path / "prior.npy", prior)
    task = col_task(prior=str(tmp_path / "prior.npy"))
    np.testing.assert_allclose(task.class_weights, encoding.rebalancing_weights(prior / prior.sum()), rtol=1e-6)
    batch = random_batch(task)
    logits = np.random.RandomState(3).normal(0, 2, [3, 4, 4, 313]).astype(np.float32)
    loss, metrics = task.loss({"logits": tf.constant(logits)}, batch)
    ab = batch["ab"].numpy()[:, 2::4, 2::4]  # Samples every 4 px: pixels 8, 24, 40, 56.
    colour = batch["chroma"].numpy().reshape(3, 4, 2, 4, 2).max(axis=(2, 4)) >= task.config.min_chroma
    bins, weights = brute_force_encoding(np.floor(ab.reshape(-1, 2)).astype(np.float64) + 0.5)
    log_p = logits.reshape(-1, 313) - np.log(np.exp(logits.reshape(-1, 313)).sum(-1, keepdims=True))
    cross_entropy = -(weights * np.take_along_axis(log_p, bins, 1)).sum(-1) * task.class_weights[bins[:, 0]]
    mask = colour.reshape(3, -1)
    expected = (cross_entropy.reshape(3, -1) * mask).sum(1) / np.maximum(mask.sum(1), 1)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-4)
    assert mask[:2].all() and not mask[2].any() and loss.numpy()[2] == 0.0  # The grey photo.
    hits = (logits.reshape(-1, 313).argmax(-1) == bins[:, 0]).reshape(3, -1)
    np.testing.assert_allclose(metrics["accuracy"][0].numpy()[:2], hits[:2].mean(1))
    np.testing.assert_array_equal(metrics["accuracy"][1].numpy(), [16, 16, 0])
    decoded = encoding.annealed_mean(logits).numpy().reshape(3, -1, 2)
    np.testing.assert_allclose(metrics["ab_error"][0].numpy()[:2],
                               np.linalg.norm(decoded - ab.reshape(3, -1, 2), axis=-1)[:2].mean(1), rtol=1e-4)


def test_perfect_logits_score_full_accuracy_and_small_error_and_grey_never_nans():
    task = col_task()
    batch = random_batch(task)
    ab, _ = task.targets(batch, (4, 4))
    bins, weights = encoding.soft_encode(ab)
    # Logits of the soft target itself: decoding lands near the true ab.
    logits = tf.math.log(tf.reduce_sum(tf.one_hot(bins, 313) * weights[..., None], -2) + 1e-6)
    loss, metrics = task.loss({"logits": tf.cast(logits, tf.float16)}, batch)  # Reduced precision is cast.
    assert np.all(np.isfinite(loss.numpy()))
    assert np.all(metrics["accuracy"][0].numpy()[:2] == 1.0)
    assert np.all(metrics["ab_error"][0].numpy()[:2] < 4.0)
    grey = {k: v[2:] for k, v in batch.items()}
    loss, metrics = task.loss({"logits": tf.zeros([1, 4, 4, 313])}, grey)
    assert loss.numpy()[0] == 0.0 and metrics["ab_error"][1].numpy()[0] == 0.0
    assert np.isfinite(metrics["ab_error"][0].numpy()).all()


def test_trunk_sees_grey_and_head_predicts_313_bins_per_cell():
    task = col_task()
    batch = random_batch(task, 2)
    trunk_input = task.trunk_images(batch).numpy()
    assert trunk_input.shape == (2, 64, 64, 3) and trunk_input.dtype == np.float32
    np.testing.assert_array_equal(trunk_input[..., 0], trunk_input[..., 2])
    with tf.Graph().as_default():
        block3 = tf.compat.v1.placeholder(tf.float32, [2, 4, 4, 128])
        logits = task.head(block3, {}, batch, is_training=False)["logits"]
    assert logits.shape.as_list() == [2, 4, 4, 313]
    pictures = task.image_summaries(batch, {"logits": tf.zeros([2, 4, 4, 313])})["grey_prediction_truth"]
    assert pictures.shape == (2, 64, 192, 3)
    assert 0.0 <= float(tf.reduce_min(pictures)) and float(tf.reduce_max(pictures)) <= 1.0
    np.testing.assert_allclose(pictures[:, :, 128:].numpy() * 255, batch["image"].numpy(), atol=1e-3)


# -- sources ------------------------------------------------------------------------------

def write_photos(directory, names: list[str], side: int = 96) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = cv2.resize(photo(name), (side, side), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(directory / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return str(directory)


GREY = ["camera", "coins", "moon", "brick"]
COLOUR = ["astronaut", "coffee", "chelsea"]


def test_a_source_without_colour_photos_is_a_clear_error_at_start(tmp_path):
    task = col_task()
    path = write_photos(tmp_path / "grey", GREY)
    with pytest.raises(DataError, match=r"col: none of the first 32 images of .*grey.* has colour"):
        task.check_source(task.open_source(path), path)


def test_a_mixed_source_yields_only_colour_crops(tmp_path):
    task = col_task()
    source = task.open_source(write_photos(tmp_path / "mixed", GREY + COLOUR))
    batches = list(task.make_dataset(source.dataset(seed=0), 8, seed=0).take(3))
    for batch in batches:
        assert set(batch) == {"image", "ab", "chroma"} and batch["ab"].shape == (8, 16, 16, 2)
        fraction = tf.reduce_mean(tf.cast(batch["chroma"] >= task.config.min_chroma, tf.float32), [1, 2])
        assert np.all(fraction.numpy() >= task.config.min_colour_fraction)
    again = list(task.make_dataset(source.dataset(seed=0), 8, seed=0).take(3))
    np.testing.assert_array_equal(batches[2]["image"].numpy(), again[2]["image"].numpy())


def test_prior_setting_and_bad_prior_files(tmp_path):
    np.testing.assert_allclose(load_prior("uniform"), 1.0)
    with pytest.raises(MtssError, match="col.prior: no file .*'data', 'uniform' or a .npy prior.*col_prior"):
        load_prior(str(tmp_path / "missing.npy"))
    with pytest.raises(MtssError, match="col.prior: no file sample"):  # The bundled photos' prior is `data` on them.
        col_task(prior="sample")
    np.save(tmp_path / "short.npy", np.ones(10))
    with pytest.raises(MtssError, match="313 non-negative"):
        load_prior(str(tmp_path / "short.npy"))


# -- the prior of the training data ------------------------------------------------------

# 64 px images of 16 px blocks: with resize_side 64 and stride 16, each block is one cell.
DATA_SETTINGS = {"prior": "data", "resize_side": "64"}
RED, GREEN, BLUE, YELLOW, WHITE = (200, 30, 40), (40, 160, 60), (30, 50, 190), (230, 210, 40), (255, 255, 255)


def write_blocks(directory, name: str, colours: list[tuple[int, int, int]]) -> None:
    """A 64 x 64 PNG of 4 x 4 blocks of 16 px, coloured row by row from `colours` (16)."""
    directory.mkdir(parents=True, exist_ok=True)
    image = np.repeat(np.repeat(np.array(colours, np.uint8).reshape(4, 4, 3), 16, 0), 16, 1)
    cv2.imwrite(str(directory / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def mostly(directory, main: tuple, other: tuple, images: int = 3) -> str:
    """Images of 12 `main` blocks, 3 `other` ones and a white one (grey: never counted)."""
    for i in range(images):
        write_blocks(directory, f"image{i}", [main] * 12 + [other] * 3 + [WHITE])
    return str(directory)


def histogram_by_hand(blocks: dict[tuple, int]) -> np.ndarray:
    """The prior of images made of flat blocks {colour: count}: each colour's ab (scikit-image)
    at its nearest bin, as the table finds it (the centre of its 1-unit square)."""
    counts = np.zeros(313)
    for colour, count in blocks.items():
        ab = skimage.color.rgb2lab(np.array([[colour]], np.uint8))[0, :, 1:]
        if np.linalg.norm(ab) >= 2.0:  # min_chroma
            counts[brute_force_encoding(np.floor(ab) + 0.5)[0][0, 0]] += count
    return counts / counts.sum()


@pytest.fixture
def prior_cache(tmp_path, monkeypatch):
    """The prior cache in tmp_path, and a count of the priors computed."""
    monkeypatch.setenv("MTSS_CACHE_DIR", str(tmp_path / "cache"))
    computed = []
    estimate = col_prior.estimate_counts

    def counting(*args, **kwargs):
        computed.append(args)
        return estimate(*args, **kwargs)

    monkeypatch.setattr(col_prior, "estimate_counts", counting)
    return computed


def started(path: str | None, **settings: str) -> Colorization:
    """A col task after the trainer's start-up check of its training data at `path`."""
    task = col_task(**{**DATA_SETTINGS, **settings})
    task.check_source(task.open_source(path), path)
    return task


@pytest.mark.slow
def test_the_prior_of_a_data_directory_is_its_histogram_not_the_sample_photos(tmp_path, prior_cache):
    red = started(mostly(tmp_path / "red", RED, GREEN))
    np.testing.assert_allclose(red.prior, histogram_by_hand({RED: 36, GREEN: 9}), atol=1e-12)
    np.testing.assert_allclose(red.class_weights, encoding.rebalancing_weights(red.prior), rtol=1e-6)
    blue = started(mostly(tmp_path / "blue", BLUE, YELLOW))
    np.testing.assert_allclose(blue.prior, histogram_by_hand({BLUE: 36, YELLOW: 9}), atol=1e-12)
    # Rebalancing favours what the data lacks: red weighs less on red data than on blue data.
    red_bin = int(encoding.nearest_bin(skimage.color.rgb2lab(np.array([[RED]], np.uint8))[0, 0, 1:]))
    assert red.class_weights[red_bin] < blue.class_weights[red_bin]
    sample = started(None)  # The bundled photos: their own prior is the sample prior.
    assert not np.allclose(sample.prior, red.prior) and np.count_nonzero(sample.prior) > 20
    assert len(prior_cache) == 3


@pytest.mark.slow
def test_the_second_start_reads_the_cache_and_a_changed_directory_recomputes(tmp_path, prior_cache, caplog):
    caplog.set_level(logging.INFO)
    data = mostly(tmp_path / "red", RED, GREEN)
    first = started(data)
    assert len(prior_cache) == 1
    entries = sorted(os.listdir(tmp_path / "cache" / "col_prior"))
    assert [os.path.splitext(e)[1] for e in entries] == [".json", ".npy"]  # No temporary file left.
    assert f"ab prior of {data}: 3 images read, 45 colour cells" in caplog.text
    caplog.clear()
    again = started(data)
    assert len(prior_cache) == 1 and "read from the cache" in caplog.text
    np.testing.assert_array_equal(again.prior, first.prior)
    # The cache entry is a prior file like any other.
    np.testing.assert_allclose(load_prior(str(tmp_path / "cache" / "col_prior" / entries[1])), first.prior)
    # Settings that change the histogram, and a new file, make a new entry.
    started(data, min_chroma="3")
    assert len(prior_cache) == 2
    write_blocks(tmp_path / "red", "added", [BLUE] * 16)
    changed = started(data)
    assert len(prior_cache) == 3
    np.testing.assert_allclose(changed.prior, histogram_by_hand({RED: 36, GREEN: 9, BLUE: 16}), atol=1e-12)


def test_at_most_prior_images_are_read(tmp_path, prior_cache):
    task = started(mostly(tmp_path / "red", RED, GREEN, images=5), prior_images="2")
    assert prior_cache[0][1] == 2
    np.testing.assert_allclose(task.prior, histogram_by_hand({RED: 24, GREEN: 6}), atol=1e-12)


def test_the_training_data_sets_the_prior_not_the_held_out_data_checked_after_it(tmp_path, prior_cache):
    task = started(mostly(tmp_path / "red", RED, GREEN))
    held_out = mostly(tmp_path / "blue", BLUE, YELLOW)
    task.check_source(task.open_source(held_out), held_out)
    np.testing.assert_allclose(task.prior, histogram_by_hand({RED: 36, GREEN: 9}), atol=1e-12)
    assert len(prior_cache) == 1


def test_a_prior_file_or_uniform_wins_over_the_data(tmp_path, prior_cache):
    data = mostly(tmp_path / "red", RED, GREEN)
    prior = np.random.RandomState(5).gamma(0.3, size=313)
    np.save(tmp_path / "prior.npy", prior)
    from_file = started(data, prior=str(tmp_path / "prior.npy"))
    np.testing.assert_allclose(from_file.prior, prior / prior.sum())
    uniform = started(data, prior="uniform")
    np.testing.assert_allclose(uniform.class_weights, encoding.rebalancing_weights(np.full(313, 1 / 313)))
    assert not prior_cache


def test_a_bad_prior_path_is_one_clear_error_before_any_data_is_read(tmp_path, prior_cache):
    config = TrainConfig(train_dir=str(tmp_path / "run"), tasks=["col"],
                         task_params={"col": {"prior": str(tmp_path / "missing.npy")}})
    with pytest.raises(MtssError, match=r"^task col: col.prior: no file .*missing.npy .*col_prior --data DIR") as e:
        build_tasks(config)
    assert "\n" not in str(e.value) and not prior_cache


def test_the_loss_without_a_prior_says_what_is_missing():
    task = col_task(prior="data")
    with pytest.raises(MtssError, match="check_source"):
        task.loss({"logits": tf.zeros([3, 4, 4, 313])}, random_batch(task))


def test_an_unwritable_cache_still_gives_the_prior(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("MTSS_CACHE_DIR", str(tmp_path / "file"))
    caplog.set_level(logging.INFO)
    task = started(mostly(tmp_path / "red", RED, GREEN))
    np.testing.assert_allclose(task.prior, histogram_by_hand({RED: 36, GREEN: 9}), atol=1e-12)
    assert "could not cache the ab prior" in caplog.text and "not cached" in caplog.text


@pytest.mark.parametrize("field, value, fragment", [
    ("crop", "100", "col.crop"), ("resize_side", "32", "resize_side"), ("rebalance", "2", "rebalance"),
    ("temperature", "0", "temperature"), ("output_stride", "none", "output_stride"),
    ("prior_images", "0", "prior_images"),
])
def test_bad_settings_are_rejected(field, value, fragment):
    with pytest.raises(MtssError, match=fragment):
        col_task(**{field: value})


def test_registered_under_col():
    assert task_class("col") is Colorization
    assert Colorization.input_colour == "grey" and Colorization.Config().output_stride == 16
    assert Colorization.Config().prior == "data"


def test_the_prior_library_defines_no_flags():
    # The trainer imports it (through col) and has a --data of its own; the command defines
    # --data, --out and --images only when it runs.
    assert not flags.FLAGS.get_key_flags_for_module(col_prior.__name__)


@pytest.mark.slow
def test_prior_command_writes_the_histogram_of_colour_cells(tmp_path):
    data = write_photos(tmp_path / "mixed", GREY[:2] + COLOUR[:2], side=256)
    out = tmp_path / "prior.npy"
    run = run_cli("mtss_train.tasks.col_prior", "--data", data, "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "4/4 images" in run.stderr and "ETA" in run.stderr and f"col.prior={out}" in run.stdout
    prior = np.load(out)
    assert prior.shape == (313,) and np.isclose(prior.sum(), 1.0)
    # Only the colour photos count: the same as their prior alone.
    colour = image_source(write_photos(tmp_path / "colour", COLOUR[:2], side=256), MIN_IMAGE_SIDE)
    alone, read = col_prior.estimate_counts(colour.dataset(seed=0), 2, Colorization.Config())
    assert read == 2
    np.testing.assert_allclose(prior, alone / alone.sum())
    grey = run_cli("mtss_train.tasks.col_prior", "--data", write_photos(tmp_path / "grey", GREY[:2]),
                   "--out", str(tmp_path / "grey.npy"))
    assert_one_line_error(grey, "no colour cell", "grey")


# -- training -----------------------------------------------------------------------------

def scalars(log_dir, tag: str) -> list[float]:
    """The values of a TensorBoard scalar, in step order."""
    found = []
    for path in glob.glob(str(log_dir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            found += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value if v.tag == tag]
    return [value for _, value in sorted(found)]


@pytest.mark.slow
def test_training_on_a_mixed_source_lowers_the_loss(tmp_path):
    params = {**SMALL, "batch_size": "8", "data": write_photos(tmp_path / "mixed", GREY + COLOUR, side=128)}
    trainer = Trainer(TrainConfig(
        train_dir=str(tmp_path / "run"), tasks=["col"], task_params={"col": params}, trunk_size="tiny",
        max_steps=40, learning_rate=1e-3, rmsprop_epsilon=1e-3, batch_norm_decay=0.9, save_every_steps=40,
        summary_every_steps=10,
    ))
    trainer.train()
    # Training-mode means over steps 1-10, ..., 31-40; one run here gave 5.73, 5.05, 4.44, 3.79.
    losses = scalars(tmp_path / "run" / "logs", "train/col/loss")
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses
    trained = trainer.evaluate(trainer.sources, batches=4)["col"]
    # With a uniform prior (weights 1) a uniform prediction scores log(313) = 5.75 and top-1
    # accuracy ~1/313. Two runs here gave loss 3.4-3.6, accuracy 0.30-0.41, ab error 12-14.
    # (Untrained nets score far worse in inference mode: BN statistics are still unset.)
    assert trained["loss"] < np.log(313) - 1.5, trained
    assert trained["accuracy"] > 0.15 and trained["ab_error"] < 25, trained


def test_grey_only_data_fails_at_start_also_when_rp_opens_the_source(tmp_path):
    with pytest.raises(DataError, match="col: none of the first 32 images.*has colour"):
        Trainer(parse("--train_dir", str(tmp_path / "run"), "--smoke", "--tasks", f"rp,{COL}",
                      "--data", write_photos(tmp_path / "grey", GREY, side=256)))
