"""The embedded default data: real photographs that scikit-image installs with itself.

They come with the `scikit-image` wheel (no download), so `python -m mtss_train` trains on
real images on a fresh machine. Synthetic images (charts, logos, phantoms) are left out.
"""

import os

import skimage

PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
    "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
    "rocket.jpg",
)


def sample_photo_dir() -> str:
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def sample_photo_paths() -> list[str]:
    """Paths of the bundled photos present in this scikit-image install."""
    directory = sample_photo_dir()
    return [os.path.join(directory, n) for n in PHOTOS if os.path.isfile(os.path.join(directory, n))]
