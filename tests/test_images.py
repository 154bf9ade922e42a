"""Image input: directories and TFRecords, bad files skipped and counted, clear errors.

The pipeline is TF ops (mtss_train.data.in_graph); tests/test_in_graph.py tests its parts."""

import logging
import os
import threading
import zlib

import cv2
import numpy as np
import pytest
import skimage.data

from mtss_train.compat import tf
from mtss_train.data import in_graph, sample
from mtss_train.data.images import TFRECORD_IMAGE_KEY, ReadOptions, decode_rgb, find_sources, image_source
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
    assert source.skipped.count == 2  # The undecodable record and the truncated file.


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


@pytest.mark.slow
def test_tfrecords_with_another_image_key_say_which_keys_they_have(tmp_path):
    with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as writer:
        for image in (skimage.data.coffee(), skimage.data.chelsea()):
            feature = {"image/jpeg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png(image)])),
                       "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with pytest.raises(DataError) as error:
        image_source(str(tmp_path), 32)
    assert str(error.value) == (
        f"the TFRecords in {tmp_path} have no 'image/encoded' feature, which should hold the encoded image; "
        "their records have: image/jpeg, label (pick one with --image_key)")
    source = image_source(str(tmp_path), 32, ReadOptions(image_key="image/jpeg"))
    assert sorted(take_shapes(source, 2)) == [(300, 451, 3), (400, 600, 3)]


def test_a_truncated_tfrecord_file_is_named_in_a_warning_and_counted_once(tmp_path, caplog):
    write_records(str(tmp_path / "a.tfrecord"), [png(skimage.data.coffee())] * 2)
    truncated = write_records(str(tmp_path / "b.tfrecord"), [png(skimage.data.astronaut())] * 4)
    os.truncate(truncated, os.path.getsize(truncated) // 2 + 1000)  # Two whole records, then half of one.
    source = image_source(str(tmp_path), 32)
    with caplog.at_level(logging.WARNING):
        shapes = [tuple(i.shape) for i in source.dataset(seed=0).take(12)]  # Three epochs.
    assert shapes.count((512, 512, 3)) == 6  # The two records before the damage, each epoch.
    named = [r for r in caplog.records if truncated in r.getMessage()]
    assert len(named) == 1 and named[0].levelno == logging.WARNING
    assert "truncated or corrupt TFRecord file (read 2 records" in named[0].getMessage()
    assert source.skipped.count == 1


def test_a_tfrecord_file_that_cannot_be_opened_is_counted_with_the_reason(tmp_path):
    write_records(str(tmp_path / "a.tfrecord"), [png(skimage.data.coffee())])
    os.symlink(tmp_path / "moved_away.tfrecord", tmp_path / "gone.tfrecord")
    source = image_source(str(tmp_path), 32)
    assert take_shapes(source, 3) == [(400, 600, 3)] * 3
    assert source.skipped.reasons() == {str(tmp_path / "gone.tfrecord"): "could not be read (No such file or directory)"}


def test_files_that_cannot_be_opened_are_reported_as_unreadable(tmp_path):
    os.symlink(tmp_path / "moved_away.jpg", tmp_path / "gone.jpg")  # A link to a moved file.
    expected = ["1 could not be read", "gone.jpg (No such file or directory)"]
    if os.geteuid() != 0:  # Root reads whatever the permissions say.
        write_photo(str(tmp_path / "locked.png"), skimage.data.chelsea())
        os.chmod(tmp_path / "locked.png", 0)
        expected[0] = "2 could not be read"
    with pytest.raises(DataError) as error:
        image_source(str(tmp_path), 32)
    assert all(fragment in str(error.value) for fragment in expected), error.value


def png_claiming(height: int, width: int) -> bytes:
    """A small PNG whose header (with a valid checksum) claims height x width pixels."""
    data = bytearray(png(np.zeros([40, 40, 3], np.uint8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR's first fields.
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # Over IHDR's type and data.
    return bytes(data)


def test_headers_give_the_size_without_decoding():
    photo = skimage.data.chelsea()
    jpeg = cv2.imencode(".jpg", photo)[1].tobytes()

    def size(encoded: bytes) -> tuple[int, int]:
        return tuple(int(side) for side in in_graph.header_size(tf.constant(encoded)))

    assert size(png(photo)) == size(jpeg) == (300, 451)
    assert size(png_claiming(12_000, 13_000)) == (12_000, 13_000)
    assert size(jpeg[:1000]) == (300, 451)  # The frame header is near the start.
    assert size(b"GIF89a...") == (-1, -1)


def test_images_over_the_pixel_limit_are_skipped_from_their_header_before_decoding(tmp_path):
    write_photo(str(tmp_path / "cat.png"), skimage.data.chelsea())  # 135,300 pixels.
    # Headers over the limit in front of data that does not decode: only a size read from
    # the header says "too many pixels" of them.
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR))[1].tobytes()
    (tmp_path / "coffee.jpg").write_bytes(jpeg[:2000])  # 240,000 pixels, then cut off.
    (tmp_path / "huge.png").write_bytes(png_claiming(12_000, 12_000))  # Holds 40x40 pixels.
    source = image_source(str(tmp_path), 32, ReadOptions(max_pixels=200_000))
    assert set(take_shapes(source, 4)) == {(300, 451, 3)}
    assert source.skipped.reasons() == {
        str(tmp_path / "coffee.jpg"): "too many pixels (600x400 = 0.2M, over the limit of 0.2M, --max_image_pixels)",
        str(tmp_path / "huge.png"): "too many pixels (12000x12000 = 144.0M, over the limit of 0.2M, --max_image_pixels)",
    }
    under_the_limit = image_source(str(tmp_path), 32, ReadOptions(max_pixels=200_000_000))
    take_shapes(under_the_limit, 4)
    assert under_the_limit.skipped.reasons() == {str(tmp_path / "coffee.jpg"): "not a decodable image",
                                                 str(tmp_path / "huge.png"): "not a decodable image"}


def test_the_python_reader_gives_the_pipelines_pixels_and_refuses_what_it_skips(tmp_path):
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR))[1].tobytes()
    for name, encoded in (("a.png", png(skimage.data.chelsea())), ("b.jpg", jpeg)):
        (tmp_path / name).write_bytes(encoded)
        source = image_source(str(tmp_path / name), 32)
        np.testing.assert_array_equal(decode_rgb(encoded, 32), next(iter(source.dataset(seed=0))).numpy())
    assert decode_rgb(png(skimage.data.chelsea()), 301) is None  # Too small.
    assert decode_rgb(png_claiming(12_000, 12_000), 32) is None  # Too many pixels, by its header.
    assert decode_rgb(jpeg, 32, max_pixels=200_000) is None
    assert decode_rgb(png(skimage.data.chelsea())[:5000], 32) is None and decode_rgb(b"", 32) is None


def test_a_truncated_png_is_skipped_without_decoder_noise(tmp_path, capfd):
    good = write_photo(str(tmp_path / "good.png"), skimage.data.chelsea())
    (tmp_path / "half.png").write_bytes(open(good, "rb").read()[:50_000])
    source = image_source(str(tmp_path), 32)
    assert len(take_shapes(source, 4)) == 4
    assert list(source.skipped.reasons()) == [str(tmp_path / "half.png")]
    assert source.skipped.reasons()[str(tmp_path / "half.png")].startswith("truncated PNG")
    assert "libpng" not in capfd.readouterr().err
