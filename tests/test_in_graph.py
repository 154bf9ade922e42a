"""The one input pipeline's parts (mtss_train.data.in_graph): TF ops only, so
parameter-server workers build it too; bad inputs skipped, counted and named through a
Python call made for them alone; every epoch a new order from a seed that may be a tensor;
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
from mtss_train.data.images import image_source
from mtss_train.data.masks import TFRECORD_FRAME_KEY, mask_source
from mtss_train.task import make_config, task_class
from test_images import png, png_claiming, write_photo, write_records
from test_ms import identify, numbered_pair, write_extracted, write_pair_records


class Reports(list):
    """A `report` that keeps (key, reason, evidence) as str, str, bytes."""

    def __call__(self, key: bytes, reason: bytes, evidence: bytes) -> None:
        self.append((key.decode(), reason.decode(), bytes(evidence)))


def examine_numbers(text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """'7' -> 7; 'bad...' raises (as an unreadable file does); 'small...' is a soft skip."""
    soft = tf.strings.regex_full_match(text, "small.*")
    number = tf.cond(soft, lambda: tf.constant(-1), lambda: tf.strings.to_number(text, tf.int32))  # Raises on 'bad'.
    return text, number, tf.where(soft, "too small", "")


def diagnose_numbers(text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    return text, tf.constant("not a number"), text


def numbers_through(items: list[str], chunk: int) -> tuple[list[int], Reports]:
    reports = Reports()
    values = in_graph.decoded(tf.data.Dataset.from_tensor_slices(items), examine_numbers, diagnose_numbers,
                              lambda: tf.constant(-1), reports, chunk)
    return [int(v) for v in values.as_numpy_iterator()], reports


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_raising_and_skipped_inputs_are_reported_in_order_wherever_they_fall_in_a_chunk(chunk):
    # Bad inputs first, last, in runs longer than a chunk, and a whole chunk of them.
    items = ["bad0", "1", "bad2", "bad3", "small4", "5", "bad6", "bad7", "bad8", "bad9", "10", "11", "bad12"]
    values, reports = numbers_through(items, chunk)
    assert values == [1, 5, 10, 11]
    bad = [item for item in items if not item.isdigit()]
    assert [key for key, _, _ in reports] == bad
    assert all(reason == ("too small" if key.startswith("small") else "not a number") for key, reason, _ in reports)
    assert [evidence for key, _, evidence in reports if key.startswith("bad")] == [
        item.encode() for item in bad if item.startswith("bad")]


def test_a_source_with_no_bad_input_reports_nothing():
    values, reports = numbers_through([str(n) for n in range(40)], in_graph.CHUNK)
    assert values == list(range(40)) and reports == []


def test_skip_reports_are_python_only_for_bad_inputs_and_a_per_element_callback_is_seen():
    reports = Reports()
    numbers = in_graph.decoded(tf.data.Dataset.from_tensor_slices(["1", "bad"]), examine_numbers, diagnose_numbers,
                               lambda: tf.constant(-1), reports)
    assert not in_graph.calls_python(numbers)
    assert in_graph.calls_python(numbers.map(lambda n: tf.numpy_function(lambda x: x, [n], tf.int32)))


def test_attempt_gives_the_value_or_says_it_failed():
    assert [x.numpy() for x in in_graph.attempt(tf.strings.to_number, tf.constant("2.5"))] == [2.5, True]
    value, ok = in_graph.attempt(tf.strings.to_number, tf.constant("two"))
    assert not ok and value.numpy() == 0


def test_bad_images_are_skipped_counted_and_named_with_their_reason(tmp_path):
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
    dataset = source.dataset(seed=0)
    assert not in_graph.calls_python(dataset)
    images = [image.numpy() for image in dataset.take(6)]  # Three epochs of the two good ones.
    assert sorted(image.shape for image in images) == [(300, 451, 3)] * 3 + [(400, 600, 3)] * 3
    np.testing.assert_array_equal(next(i for i in images if i.shape == (300, 451, 3)), skimage.data.chelsea())
    assert source.skipped.reasons() == {
        str(tmp_path / "random.jpg"): "not a decodable image",
        str(tmp_path / "truncated.png"): "truncated PNG (IDAT chunk at byte 33 ends past the file's 100 bytes)",
        str(tmp_path / "empty.jpeg"): "empty",
        str(tmp_path / "tiny.png"): "too small (100x8 px, both sides must be >= 32)",
        str(tmp_path / "huge.png"): "too many pixels (20000x20000 = 400.0M, over the limit of 50M, --max_image_pixels)",
        vanishing: "could not be read (No such file or directory)",
    }


def test_tfrecords_skip_records_that_are_not_usable(tmp_path):
    path = write_records(str(tmp_path / "a.tfrecord"), [b"not an image", png(skimage.data.coffee()), b""])
    other_key = tf.train.Example(features=tf.train.Features(feature={
        "image/jpeg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png(skimage.data.coffee())]))}))
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as writer:
        writer.write(b"not an Example")
        writer.write(other_key.SerializeToString())
    source = image_source(str(tmp_path), 32)
    dataset = source.dataset(seed=0)
    assert not in_graph.calls_python(dataset)
    assert {image.shape for image in dataset.take(3)} == {(400, 600, 3)}
    b = tmp_path / "b.tfrecord"
    assert source.skipped.reasons() == {
        f"{path} (record 0)": "not a decodable image", f"{path} (record 2)": "empty",
        f"{b} (record 0)": "not a tf.train.Example",
        f"{b} (record 1)": "no 'image/encoded' feature (the record has: image/jpeg)"}


@pytest.mark.slow
def test_mask_pairs_are_skipped_by_the_file_that_is_bad(tmp_path):
    pairs = [numbered_pair(k) for k in range(5)] + [numbered_pair(5, height=10), numbered_pair(6)]
    root = write_extracted(tmp_path / "out", {"a": pairs})
    (open(os.path.join(root, "frames", "a", "000001.jpg"), "wb")).write(b"\xff\xd8 not a jpeg")
    assert cv2.imwrite(os.path.join(root, "masks", "a", "000002.png"), np.zeros([20, 20], np.uint8))
    (open(os.path.join(root, "masks", "a", "000004.png"), "wb")).write(b"")
    source = mask_source(root)
    os.remove(os.path.join(root, "masks", "a", "000006.png"))  # After the source listed it.
    dataset = source.dataset(seed=0)
    assert not in_graph.calls_python(dataset)
    assert sorted(identify(example) for example in dataset.take(6)) == [0, 0, 0, 3, 3, 3]
    assert source.skipped.reasons() == {
        os.path.join(root, "frames", "a", "000001.jpg"): "not a decodable image",
        os.path.join(root, "masks", "a", "000002.png"): "not its frame's size (20x20 px, the frame is 48x40)",
        os.path.join(root, "masks", "a", "000004.png"): "empty",
        os.path.join(root, "frames", "a", "000005.jpg"): "too small (48x10 px, both sides must be >= 16)",
        os.path.join(root, "masks", "a", "000006.png"): "could not be read (No such file or directory)",
    }


def test_mask_tfrecords_name_the_records_they_skip_by_their_number(tmp_path):
    path = tmp_path / "pairs.tfrecord"
    write_pair_records(path, [1, 2])
    good = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    only_frame = tf.train.Example(features=tf.train.Features(feature={
        TFRECORD_FRAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a frame"]))}))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in (good[0], only_frame.SerializeToString(), good[1]):
            writer.write(record)
    source = mask_source(str(path))
    dataset = source.dataset(seed=0)
    assert not in_graph.calls_python(dataset)
    assert sorted(identify(example) for example in dataset.take(4)) == [1, 1, 2, 2]
    assert source.skipped.reasons() == {
        f"{path} (record 1)": "not a tf.train.Example with 'image/encoded' and 'mask/encoded' features"}


def test_jpegs_decode_to_opencvs_pixels_without_their_exif_orientation(tmp_path):
    data = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned 90 degrees.
    Image.fromarray(skimage.data.chelsea()).save(data, "JPEG", exif=exif)
    (tmp_path / "turned.jpg").write_bytes(data.getvalue())
    decoded = next(iter(image_source(str(tmp_path), 32).dataset(seed=0))).numpy()
    opencv = cv2.imdecode(np.frombuffer(data.getvalue(), np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    np.testing.assert_array_equal(decoded, cv2.cvtColor(opencv, cv2.COLOR_BGR2RGB))  # Accurate DCT, libjpeg's default.


def test_every_epoch_is_a_new_permutation_of_a_seed_that_may_be_a_tensor():
    items = [f"item{i}".encode() for i in range(7)]

    @tf.function
    def first_epochs(seed: tf.Tensor) -> tf.Tensor:
        return in_graph.endless_permutations((items,), seed).take(21).batch(21).get_single_element()

    orders = [list(first_epochs(tf.constant(seed, tf.int64)).numpy()) for seed in (1, 1, 2)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    epochs = [orders[0][i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(epoch) == items for epoch in epochs) and len({tuple(e) for e in epochs}) == 3


def test_blocks_are_permuted_by_the_seed_and_their_number():
    elements = tf.data.Dataset.range(10).map(lambda i: (i, tf.strings.as_string(i)))
    order = lambda seed: [int(i) for i, _ in in_graph.permuted_blocks(elements, tf.constant(seed, tf.int64), 4)]  # noqa: E731
    first = order([3, 0])
    assert first == order([3, 0]) and first != order([4, 0])
    assert [sorted(first[i:i + 4]) for i in (0, 4, 8)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert first[:8] != list(range(8))  # Blocks are permuted (not all left in order).
    paired = [(int(i), text.numpy().decode()) for i, text in in_graph.permuted_blocks(elements, tf.constant([3, 0], tf.int64), 4)]
    assert all(str(i) == text for i, text in paired)  # Columns move together.


def test_tfrecords_read_after_tensorflows_global_seed_is_set_to_0(tmp_path):
    """The trainer sets it to --seed (0 by default); Dataset.shuffle cannot take a tensor seed then."""
    write_records(str(tmp_path / "a.tfrecord"), [png(skimage.data.chelsea()), png(skimage.data.coffee())])
    tf.random.set_seed(0)
    try:
        shapes = sorted(tuple(image.shape) for image in image_source(str(tmp_path), 32).dataset(seed=0).take(4))
    finally:
        tf.random.set_seed(None)
    assert shapes == [(300, 451, 3)] * 2 + [(400, 600, 3)] * 2


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_the_source_order_follows_the_seed(tmp_path, seed):
    for name, image in (("a", skimage.data.chelsea()), ("b", skimage.data.coffee()), ("c", skimage.data.astronaut())):
        write_photo(str(tmp_path / f"{name}.png"), image)
    source = image_source(str(tmp_path), 32)
    shapes = lambda s: [image.shape for image in source.dataset(s).take(6)]  # noqa: E731
    assert shapes(seed) == shapes(seed) and shapes(seed) != shapes(tf.constant(seed + 10, tf.int64))


@pytest.mark.slow
def test_a_pipeline_traced_with_a_tensor_seed_still_counts_its_skips(tmp_path):
    """As a parameter-server worker runs it: traced in a tf.function, seeded by a tensor."""
    write_photo(str(tmp_path / "chelsea.png"), skimage.data.chelsea())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    source = image_source(str(tmp_path), 32)

    @tf.function
    def shapes(seed: tf.Tensor) -> tf.Tensor:
        return source.dataset(seed).take(3).map(tf.shape).batch(3).get_single_element()

    assert shapes(tf.constant(5, tf.int64)).numpy().tolist() == [[300, 451, 3]] * 3
    assert source.skipped.reasons() == {str(tmp_path / "broken.jpg"): "not a decodable image"}


@pytest.mark.parametrize("name", ["rp", "col", "ex", "ms"])
@pytest.mark.slow
def test_every_task_takes_a_tensor_seed_as_parameter_server_workers_give_it(name):
    """Each worker draws its own seed tensor: the examples must follow it, from the same images."""
    cls = task_class(name)
    task = cls(make_config(cls, cls.smoke_settings))
    source = task.open_source(None)

    @tf.function  # As on a worker: the pipeline is traced with a symbolic seed.
    def first_batch_of(seed: tf.Tensor) -> dict[str, tf.Tensor]:
        images = source.dataset(tf.constant(0, tf.int64))
        return task.make_dataset(images, 2, seed).take(1).get_single_element()

    def first_batch(seed: int) -> dict[str, np.ndarray]:
        return {key: value.numpy() for key, value in first_batch_of(tf.constant(seed, tf.int64)).items()}

    first, again, other = first_batch(1), first_batch(1), first_batch(2)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert any(not np.array_equal(first[key], other[key]) for key in first)
