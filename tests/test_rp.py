"""Relative position: pair geometry vs label, augmentations, and the tf.data pipeline."""

import numpy as np
import pytest

from mtss_train.compat import tf
from mtss_train.data.images import image_source
from mtss_train.errors import MtssError
from mtss_train.task import make_config, task_class
from mtss_train.tasks.rp import NEIGHBOUR_OFFSETS, RelativePosition

SMALL = {"patch_size": "24", "gap": "12", "jitter": "3", "head_width": "32"}


def rp_task(**overrides: str) -> RelativePosition:
    return RelativePosition(make_config(RelativePosition, {**SMALL, **overrides}))


def coordinate_image(height: int, width: int) -> np.ndarray:
    """R = row, G = column, B = 0: every pixel says where it is."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def unscaled(task: RelativePosition, image: np.ndarray) -> RelativePosition:
    """The task with its resize pinned to the image's own pixel count (scale 1)."""
    pixels = str(image.shape[0] * image.shape[1])
    return rp_task(min_pixels=pixels, max_pixels=pixels, color="none", downsample_prob="0")


def test_patches_sit_where_the_label_says():
    image = coordinate_image(180, 200)  # Grid span 24*3 + 12*2 + 6 = 102 px fits with room.
    task = unscaled(rp_task(), image)
    step = task.config.patch_size + task.config.gap
    labels = set()
    for index in range(64):
        pair = task.make_pair(tf.constant(image), tf.constant([7, index], tf.int64))
        label, corners = int(pair["label"]), pair["corners"].numpy()
        labels.add(label)
        patches = pair["patches"].numpy()
        for patch, (y, x) in zip(patches, corners):
            # The crop really is at its corner: the coordinate image reads back (y, x).
            np.testing.assert_allclose(patch[0, 0, :2], [y, x], atol=0.5)
            assert patch.shape == (24, 24, 3)
        expected = np.array(NEIGHBOUR_OFFSETS[label]) * step
        np.testing.assert_array_less(np.abs(corners[1] - corners[0] - expected), 2 * task.config.jitter + 1)
        assert (corners >= 0).all() and (corners + 24 <= image.shape[:2]).all()
    assert labels == set(range(8))


def test_offsets_are_the_eight_neighbours_in_row_major_order():
    assert len(set(NEIGHBOUR_OFFSETS)) == 8 and (0, 0) not in NEIGHBOUR_OFFSETS
    assert list(NEIGHBOUR_OFFSETS) == sorted(NEIGHBOUR_OFFSETS)


def test_small_images_are_upscaled_until_the_grid_fits():
    task = rp_task(min_pixels="100", max_pixels="100")
    pair = task.make_pair(tf.constant(coordinate_image(40, 300)), tf.constant([0, 0], tf.int64))
    assert pair["patches"].shape == (2, 24, 24, 3)


def photo() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def test_color_drop_keeps_one_channel_and_flattens_the_others():
    task = rp_task(color="drop", downsample_prob="0")
    textured = 0
    for index in range(8):
        patches = task.make_pair(tf.constant(photo()), tf.constant([1, index], tf.int64))["patches"].numpy()
        for patch in patches:
            spread = patch.reshape(-1, 3).std(0)
            kept = spread.argmax()
            assert np.delete(spread, kept).max() <= spread[kept] / 20
            textured += spread[kept] > 5
    assert textured >= 8


def test_color_projection_removes_the_green_magenta_axis():
    task = rp_task(color="project", downsample_prob="0")
    patches = task.make_pair(tf.constant(photo()), tf.constant([1, 0], tf.int64))["patches"].numpy()
    axis = np.array([-1.0, 2.0, -1.0])
    inside = (patches > 0.5) & (patches < 254.5)  # Clipping to [0, 255] can reintroduce some.
    pixels = patches[inside.all(-1)]
    np.testing.assert_allclose((pixels - 127.5) @ axis, 0.0, atol=1e-2)


def test_downsampling_blurs_patches():
    def detail(prob: str) -> float:
        task = rp_task(color="none", downsample_prob=prob, downsample_min_pixels="16")
        patches = np.concatenate([
            task.make_pair(tf.constant(photo()), tf.constant([3, i], tf.int64))["patches"].numpy()
            for i in range(8)
        ])
        return float(np.abs(np.diff(patches, axis=2)).mean())

    assert detail("1") < 0.8 * detail("0")


@pytest.fixture(scope="module")
def sample_images():
    return image_source(None, min_side=32)


def test_batches_have_static_shapes_and_dtypes(sample_images):
    task = rp_task()
    batch = next(iter(task.make_dataset(sample_images.dataset(seed=0), 4, seed=0)))
    assert batch["patches"].shape == (4, 2, 24, 24, 3) and batch["patches"].dtype == tf.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == tf.int32
    assert batch["corners"].shape == (4, 2, 2)
    assert float(tf.reduce_min(batch["patches"])) >= 0 and float(tf.reduce_max(batch["patches"])) <= 255
    assert task.trunk_images(batch).shape == (8, 24, 24, 3)


def test_pipeline_is_deterministic_given_a_seed(sample_images):
    task = rp_task()

    def first_batches(seed: int) -> list[dict]:
        dataset = task.make_dataset(sample_images.dataset(seed=seed), 4, seed=seed)
        return [{k: v.numpy() for k, v in b.items()} for b in dataset.take(3)]

    first, again, other = first_batches(5), first_batches(5), first_batches(6)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["patches"], other[0]["patches"])


def test_head_gives_eight_logits_per_pair():
    with tf.Graph().as_default():
        block3 = tf.compat.v1.placeholder(tf.float32, [6, 2, 2, 128])  # Three pairs.
        logits = rp_task().head(block3, {}, {}, is_training=False)["logits"]
    assert logits.shape.as_list() == [3, 8]


@pytest.mark.parametrize(
    "field, value, fragment",
    [("color", "sepia", "rp.color"), ("downsample_prob", "2", "downsample_prob"),
     ("min_pixels", "0", "min_pixels"), ("batch_size", "0", "batch_size")],
)
def test_bad_settings_are_rejected(field, value, fragment):
    with pytest.raises(MtssError, match=fragment):
        rp_task(**{field: value})


def test_registered_under_rp():
    assert task_class("rp") is RelativePosition
