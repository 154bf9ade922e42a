"""TF-ops-only input pipelines (`dataset(..., pure_tf=True)`), which parameter-server workers
build themselves: the same images and pairs as the Python pipelines, bad inputs skipped and
named, no Python in the graph, every epoch a new order from a seed that may be a tensor, and
every task's examples following such a seed."""

import io
import os

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from mtss_train.compat import tf
from mtss_train.data import in_graph
from mtss_train.data.images import ReadOptions, image_source
from mtss_train.data.masks import mask_source
from test_images import png, png_claiming, write_photo, write_records
from mtss_train.data.masks import TFRECORD_FRAME_KEY
from mtss_train.task import make_config, task_class
from test_ms import identify, numbered_pair, write_extracted, write_pair_records


def skipped_lines(stderr: str) -> dict[str, str]:
    """{key: reason} of the 'warning: skipping KEY: REASON' lines."""
    lines = [line.split("warning: skipping ", 1)[1] for line in stderr.splitlines() if "warning: skipping " in line]
    return dict(line.rsplit(": ", 1) if ": " in line else (line, "") for line in lines)


def test_bad_images_are_skipped_and_named_with_their_reason(tmp_path, capfd):
    chelsea = write_photo(str(tmp_path / "chelsea.png"), skimage.data.chelsea())
    write_photo(str(tmp_path / "coffee.jpg"), skimage.data.coffee())
    (tmp_path / "random.jpg").write_bytes(os.urandom(2000))
    (tmp_path / "truncated.png").write_bytes(open(chelsea, "rb").read()[:100])
    (tmp_path / "empty.jpeg").write_bytes(b"")
    write_photo(str(tmp_path / "tiny.png"), np.zeros([8, 100, 3], np.uint8))
    (tmp_path / "huge.png").write_bytes(png_claiming(20_000, 20_000))
    vanishing = write_photo(str(tmp_path / "vanishing.png"), skimage.data.astronaut())
    source = image_source(str(tmp_path), min_side=32)
    os.remove(vanishing)  # After the source listed it.
    dataset = source.dataset(seed=0, pure_tf=True)
    assert not in_graph.calls_python(dataset) and in_graph.calls_python(source.dataset(seed=0))
    images = [image.numpy() for image in dataset.take(6)]  # Three epochs of the two good ones.
    assert sorted(image.shape for image in images) == [(300, 451, 3)] * 3 + [(400, 600, 3)] * 3
    np.testing.assert_array_equal(next(i for i in images if i.shape == (300, 451, 3)), skimage.data.chelsea())
    skipped = skipped_lines(capfd.readouterr().err)
    assert skipped == {
        str(tmp_path / "random.jpg"): "not a decodable image",
        str(tmp_path / "truncated.png"): "not a decodable image",
        str(tmp_path / "empty.jpeg"): "empty",
        str(tmp_path / "tiny.png"): "too small (100x8 px, both sides must be >= 32)",
        str(tmp_path / "huge.png"): "too many pixels (20000x20000 = 400.0M, over the limit of 50M, --max_image_pixels)",
        vanishing: "could not be read",
    }


def test_the_pixel_limit_applies(tmp_path, capfd):
    write_photo(str(tmp_path / "chelsea.jpg"), skimage.data.chelsea())
    write_photo(str(tmp_path / "small.jpg"), skimage.data.chelsea()[:100, :100])
    source = image_source(str(tmp_path), 32, ReadOptions(max_pixels=50_000))
    assert {image.shape for image in source.dataset(0, pure_tf=True).take(3)} == {(100, 100, 3)}
    assert "chelsea.jpg: too many pixels (451x300 = 0.1M, over the limit of 0.05M" in capfd.readouterr().err


def test_tfrecords_skip_records_that_are_not_usable(tmp_path, capfd):
    path = write_records(str(tmp_path / "a.tfrecord"), [b"not an image", png(skimage.data.coffee()), b""])
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as writer:
        writer.write(b"not an Example")
    source = image_source(str(tmp_path), 32)
    dataset = source.dataset(seed=0, pure_tf=True)
    assert not in_graph.calls_python(dataset)
    assert {image.shape for image in dataset.take(3)} == {(400, 600, 3)}
    skipped = skipped_lines(capfd.readouterr().err)
    assert skipped[f"{path} (record 0)"] == "not a decodable image" and skipped[f"{path} (record 2)"] == "empty"
    assert skipped[f"{tmp_path / 'b.tfrecord'} (record 0)"] == "not a tf.train.Example with an 'image/encoded' feature"


def test_mask_pairs_decode_as_in_python_and_bad_pairs_are_skipped(tmp_path, capfd):
    root = write_extracted(tmp_path / "out", {"a": [numbered_pair(k) for k in range(4)]})
    (open(os.path.join(root, "frames", "a", "000001.jpg"), "wb")).write(b"\xff\xd8 not a jpeg")
    assert cv2.imwrite(os.path.join(root, "masks", "a", "000002.png"), np.zeros([20, 20], np.uint8))
    source = mask_source(root)
    dataset = source.dataset(seed=0, pure_tf=True)
    assert not in_graph.calls_python(dataset)
    assert sorted(identify(example) for example in dataset.take(6)) == [0, 0, 0, 3, 3, 3]
    skipped = skipped_lines(capfd.readouterr().err)
    assert skipped == {os.path.join(root, "frames", "a", "000001.jpg"): "it or its mask is not a decodable image",
                       os.path.join(root, "frames", "a", "000002.jpg"): "its mask is not the frame's size"}


def test_mask_tfrecords_name_the_records_they_skip_by_their_number(tmp_path, capfd):
    path = tmp_path / "pairs.tfrecord"
    write_pair_records(path, [1, 2])
    good = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    only_frame = tf.train.Example(features=tf.train.Features(feature={
        TFRECORD_FRAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a frame"]))}))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in (good[0], only_frame.SerializeToString(), good[1]):
            writer.write(record)
    dataset = mask_source(str(path)).dataset(seed=0, pure_tf=True)
    assert not in_graph.calls_python(dataset)
    assert sorted(identify(example) for example in dataset.take(4)) == [1, 1, 2, 2]
    skipped = capfd.readouterr().err
    assert f"{path} (record 1)" in skipped and f"{path} (record 2)" not in skipped  # Numbered before the drop.


def test_every_pipeline_ignores_exif_orientation(tmp_path):
    data = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned 90 degrees.
    Image.fromarray(skimage.data.chelsea()).save(data, "JPEG", exif=exif)
    (tmp_path / "turned.jpg").write_bytes(data.getvalue())
    source = image_source(str(tmp_path), 32)
    from_opencv = next(iter(source.dataset(seed=0))).numpy()
    from_tf = next(iter(source.dataset(seed=0, pure_tf=True))).numpy()
    assert from_opencv.shape == from_tf.shape == (300, 451, 3)
    assert np.abs(from_opencv.astype(int) - from_tf).mean() < 2  # Two JPEG decoders, nearly the same pixels.


def test_every_epoch_is_a_new_permutation_of_a_seed_that_may_be_a_tensor():
    items = [f"item{i}".encode() for i in range(7)]

    @tf.function
    def first_epochs(seed: tf.Tensor) -> tf.Tensor:
        return in_graph.endless_permutations((items,), seed).take(21).batch(21).get_single_element()

    orders = [list(first_epochs(tf.constant(seed, tf.int64)).numpy()) for seed in (1, 1, 2)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    epochs = [orders[0][i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(epoch) == items for epoch in epochs) and len({tuple(e) for e in epochs}) == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_the_source_order_follows_the_seed(tmp_path, seed):
    for name, image in (("a", skimage.data.chelsea()), ("b", skimage.data.coffee()), ("c", skimage.data.astronaut())):
        write_photo(str(tmp_path / f"{name}.png"), image)
    source = image_source(str(tmp_path), 32)
    shapes = lambda s: [image.shape for image in source.dataset(s, pure_tf=True).take(6)]  # noqa: E731
    assert shapes(seed) == shapes(seed) and shapes(seed) != shapes(tf.constant(seed + 10, tf.int64))


@pytest.mark.parametrize("name", ["rp", "col", "ex", "ms"])
def test_every_task_takes_a_tensor_seed_as_parameter_server_workers_give_it(name):
    """Each worker draws its own seed tensor: the examples must follow it, from the same images."""
    cls = task_class(name)
    task = cls(make_config(cls, cls.smoke_settings))
    source = task.open_source(None)

    @tf.function  # As on a worker: the pipeline is traced with a symbolic seed.
    def first_batch_of(seed: tf.Tensor) -> dict[str, tf.Tensor]:
        images = source.dataset(tf.constant(0, tf.int64), pure_tf=True)
        return task.make_dataset(images, 2, seed).take(1).get_single_element()

    def first_batch(seed: int) -> dict[str, np.ndarray]:
        return {key: value.numpy() for key, value in first_batch_of(tf.constant(seed, tf.int64)).items()}

    first, again, other = first_batch(1), first_batch(1), first_batch(2)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert any(not np.array_equal(first[key], other[key]) for key in first)
