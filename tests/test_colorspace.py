"""sRGB <-> Lab in TF ops: against scikit-image on real photos, round trips, grey."""

import numpy as np
import pytest
import skimage.color
import skimage.data

from mtss_train.model import colorspace
from mtss_train.compat import tf

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry")


def photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


@pytest.mark.parametrize("name", PHOTOS)
def test_lab_matches_skimage_on_photos(name):
    image = photo(name)
    reference = skimage.color.rgb2lab(image)
    for given in (image, image.astype(np.float32)):  # uint8 table path and float path
        np.testing.assert_allclose(colorspace.rgb_to_lab(given).numpy(), reference, rtol=0, atol=0.05)


def test_lab_matches_skimage_over_the_whole_cube_corners_and_greys():
    levels = np.array([0, 1, 10, 11, 12, 64, 128, 200, 254, 255], np.uint8)
    colours = np.stack(np.meshgrid(levels, levels, levels), -1).reshape(-1, 3)
    np.testing.assert_allclose(colorspace.rgb_to_lab(colours).numpy(),
                               skimage.color.rgb2lab(colours[None])[0], rtol=0, atol=0.05)


@pytest.mark.parametrize("name", PHOTOS[:3])
def test_lab_to_rgb_round_trips_within_one_level(name):
    image = photo(name)
    back = colorspace.lab_to_rgb(colorspace.rgb_to_lab(image)).numpy()
    assert back.dtype == np.float32
    assert np.abs(back - image).max() <= 1.0 / 255.0


def test_lab_to_rgb_matches_skimage_and_clips_out_of_gamut():
    lab = np.array([[50.0, 20.0, -30.0], [80.0, -40.0, 60.0], [50.0, 120.0, 0.0], [100.0, 0.0, 0.0]])
    rgb = colorspace.lab_to_rgb(lab).numpy()
    assert rgb.min() >= 0.0 and rgb.max() <= 255.0
    np.testing.assert_allclose(rgb[:2], 255 * skimage.color.lab2rgb(lab[None, :2])[0], atol=0.05)
    np.testing.assert_allclose(rgb[3], [255, 255, 255], atol=1e-3)


def test_grey_rgb_is_the_lightness_alone():
    image = photo("astronaut")
    grey = colorspace.grey_rgb(image).numpy()
    lab = colorspace.rgb_to_lab(image).numpy()
    lab[..., 1:] = 0.0
    np.testing.assert_allclose(grey, colorspace.lab_to_rgb(lab).numpy(), atol=2e-3)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    # Its lightness is the image's, and its colour is gone.
    back = colorspace.rgb_to_lab(grey).numpy()
    np.testing.assert_allclose(back[..., 0], colorspace.rgb_to_lab(image).numpy()[..., 0], atol=1e-3)
    assert np.abs(back[..., 1:]).max() < 1e-3


def test_neutral_colours_have_no_chroma_and_white_is_100():
    greys = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    lab = colorspace.rgb_to_lab(greys).numpy()
    assert np.abs(lab[:, 1:]).max() < 1e-3
    np.testing.assert_allclose(lab[[0, 255], 0], [0.0, 100.0], atol=1e-3)
    assert np.all(np.diff(lab[:, 0]) > 0)


def test_any_leading_dims_and_tf_function():
    batch = np.stack([photo("coffee")[:32, :48]] * 2).reshape(2, 1, 32, 48, 3)
    lab = tf.function(colorspace.rgb_to_lab)(tf.constant(batch))
    assert lab.shape == (2, 1, 32, 48, 3)
    np.testing.assert_allclose(lab.numpy()[1, 0], skimage.color.rgb2lab(batch[1, 0]), atol=0.05)
    dataset = tf.data.Dataset.from_tensor_slices(batch[:, 0]).map(colorspace.grey_rgb)
    assert next(iter(dataset)).shape == (32, 48, 3)
