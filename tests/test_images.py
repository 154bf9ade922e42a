"""Image input: directories and TFRecords, bad files skipped and counted, clear errors."""

import os
import threading

import cv2
import numpy as np
import pytest
import skimage.data

from mtss_train.compat import tf
from mtss_train.data import sample
from mtss_train.data.images import TFRECORD_IMAGE_KEY, find_sources, image_source
from mtss_train.errors import DataError


def write_photo(path: str, image: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def take_shapes(source, count: int) -> list[tuple]:
    return [tuple(image.shape) for image in source.dataset(seed=0).take(count)]


def test_embedded_sample_is_real_photos():
    paths = sample.sample_photo_paths()
    assert len(paths) >= 12
    source = image_source(None, min_side=32)
    shapes = take_shapes(source, len(paths))
    assert all(len(s) == 3 and s[2] == 3 and min(s[:2]) >= 256 for s in shapes)
    assert source.skipped.count == 0


def test_directory_is_searched_recursively(tmp_path):
    write_photo(str(tmp_path / "a" / "b" / "cat.PNG"), skimage.data.chelsea())
    write_photo(str(tmp_path / "coffee.jpeg"), skimage.data.coffee())
    (tmp_path / "notes.txt").write_text("not an image")
    kind, paths = find_sources(str(tmp_path))
    assert kind == "files" and [os.path.basename(p) for p in paths] == ["cat.PNG", "coffee.jpeg"]
    assert sorted(take_shapes(image_source(str(tmp_path), 32), 2)) == [(300, 451, 3), (400, 600, 3)]


def test_corrupt_truncated_and_tiny_images_are_skipped_and_counted(tmp_path):
    good = write_photo(str(tmp_path / "good.png"), skimage.data.chelsea())
    (tmp_path / "random.jpg").write_bytes(os.urandom(2000))
    (tmp_path / "truncated.png").write_bytes(open(good, "rb").read()[:100])
    (tmp_path / "empty.jpeg").write_bytes(b"")
    write_photo(str(tmp_path / "tiny.png"), np.zeros([8, 100, 3], np.uint8))
    source = image_source(str(tmp_path), min_side=32)
    images = [image.numpy() for image in source.dataset(seed=0).take(3)]
    assert all(image.shape == (300, 451, 3) for image in images)
    np.testing.assert_array_equal(images[0], skimage.data.chelsea())
    images += [image.numpy() for image in source.dataset(seed=1).take(3)]  # More epochs.
    assert source.skipped.count == 4  # Each bad file once, however often it is met.


def write_records(path: str, encoded_images: list[bytes]) -> str:
    with tf.io.TFRecordWriter(path) as writer:
        for encoded in encoded_images:
            feature = {TFRECORD_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return path


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_tfrecords_of_encoded_images(tmp_path):
    path = write_records(str(tmp_path / "train.tfrecord"), [png(skimage.data.coffee()), png(skimage.data.astronaut())])
    assert find_sources(str(tmp_path)) == ("tfrecords", [path])
    assert sorted(take_shapes(image_source(str(tmp_path), 32), 2)) == [(400, 600, 3), (512, 512, 3)]


def test_corrupt_records_and_truncated_tfrecord_files_are_skipped(tmp_path):
    write_records(str(tmp_path / "a.tfrecord"), [b"not an image", png(skimage.data.coffee())])
    truncated = write_records(str(tmp_path / "b.tfrecord"), [png(skimage.data.astronaut())] * 2)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 1000)
    source = image_source(str(tmp_path), 32)
    shapes = set(take_shapes(source, 6))
    assert (400, 600, 3) in shapes and shapes <= {(400, 600, 3), (512, 512, 3)}
    assert source.skipped.count >= 1  # The undecodable record; truncated data is dropped by tf.data.


def test_tfrecords_without_a_decodable_image_fail_fast(tmp_path):
    write_records(str(tmp_path / "a.tfrecord"), [b"not an image"] * 3)
    with pytest.raises(DataError, match="none of the images in the 1 TFRecord file"):
        image_source(str(tmp_path), 32)


def test_shards_split_the_files(tmp_path):
    for name, image in [("a.png", skimage.data.chelsea()), ("b.png", skimage.data.coffee())]:
        write_photo(str(tmp_path / name), image)
    source = image_source(str(tmp_path), 32)
    shard_shapes = [
        {tuple(i.shape) for i in source.dataset(seed=0, shard=(2, index)).take(4)} for index in range(2)
    ]
    assert shard_shapes == [{(300, 451, 3)}, {(400, 600, 3)}]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: None, "no images"),
        (lambda d: (d / "bad.jpg").write_bytes(b"\xff\xd8 not really"), "none of the images in the 1 image file"),
    ],
    ids=["empty", "all-corrupt"],
)
def test_unusable_directories_fail_fast_naming_the_path(tmp_path, make, fragment):
    make(tmp_path)
    with pytest.raises(DataError, match=fragment) as error:
        image_source(str(tmp_path), 32)
    assert str(tmp_path) in str(error.value)


def test_missing_path():
    with pytest.raises(DataError, match="/no/such/dir does not exist"):
        image_source("/no/such/dir", 32)


def test_tfrecord_files_are_split_between_shards(tmp_path):
    write_records(str(tmp_path / "a.tfrecord"), [png(skimage.data.coffee())] * 2)
    write_records(str(tmp_path / "b.tfrecord"), [png(skimage.data.astronaut())] * 2)
    source = image_source(str(tmp_path), 32)
    shard_shapes = [
        {tuple(i.shape) for i in source.dataset(seed=0, shard=(2, index)).take(4)} for index in range(2)
    ]
    assert shard_shapes == [{(400, 600, 3)}, {(512, 512, 3)}]


def test_a_link_back_up_the_tree_is_listed_once_not_forever(tmp_path):
    write_photo(str(tmp_path / "a" / "cat.png"), skimage.data.chelsea())
    os.symlink(".", tmp_path / "loop")  # ln -s . loop
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink("a", tmp_path / "alias")  # A second route into one directory.
    listing: list = []
    worker = threading.Thread(target=lambda: listing.append(find_sources(str(tmp_path))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "listing a directory with a link loop did not end"
    kind, paths = listing[0]
    assert kind == "files" and len(paths) == 1 and paths[0].endswith("cat.png")
