"""Beam data preparation: image shards and motion masks on the DirectRunner's engine, the
trainer reading them, equality with the single-machine extractor, bad inputs, reruns."""

import contextlib
import io
import os
import re
import shutil

import cv2
import numpy as np
import pytest

# apache-beam is in the test extra but not in a plain install, where these tests skip; CI
# installs the test extra, so there a missing Beam is a broken install, never a silent skip.
try:
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as e:
    if not os.environ.get("CI"):
        pytest.skip(f"apache-beam is not installed ({e}): pip install -e '.[test]'", allow_module_level=True)
    pytest.fail(f"CI is set but apache-beam cannot be imported ({e}): .ci/run installs '.[test]', "
                "which must include it")

from conftest import run_cli
from mtss_train.compat import tf
from mtss_train.data import beam_io, clip, motion_masks, prepare, prepare_masks, sample
from mtss_train.data.images import decode_rgb, image_source
from mtss_train.data.masks import mask_source
from mtss_train.data.motion_saliency import MaskSettings
from mtss_train.data.prepare_images import ImageSettings, cap_pixels, prepare_image, prepare_images
from mtss_train.errors import DataError, MtssError

IN_PROCESS = ["--runner=FnApiRunner"]
TWO_PROCESSES = IN_PROCESS + ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
PHOTOS = ("coffee.png", "chelsea.png", "rocket.jpg", "camera.png")
CLIP_FRAMES = 10


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_shards(directory, prefix: str, keys: dict[str, tf.io.FixedLenFeature]) -> list[list[dict]]:
    """The parsed examples of each PREFIX-*.tfrecord under `directory`, in file order."""
    shards = []
    for path in sorted(tf.io.gfile.glob(os.path.join(str(directory), f"{prefix}-*.tfrecord"))):
        records = tf.data.TFRecordDataset(path).map(lambda r: tf.io.parse_single_example(r, keys))
        shards.append(list(records.as_numpy_iterator()))
    return shards


IMAGE_KEYS = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
              "image/filename": tf.io.FixedLenFeature([], tf.string),
              "image/height": tf.io.FixedLenFeature([], tf.int64)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """4 sample photos, a duplicate, and one each unreadable, undecodable (2) and too small."""
    root = tmp_path_factory.mktemp("photos")
    sources = {os.path.basename(p): p for p in sample.sample_photo_paths()}
    for name in PHOTOS:
        shutil.copy(sources[name], root / name)
    (root / "more").mkdir()
    shutil.copy(sources["coffee.png"], root / "more" / "coffee_again.png")
    (root / "broken.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    (root / "empty.png").write_bytes(b"")
    cv2.imwrite(str(root / "tiny.png"), np.full([16, 16, 3], 128, np.uint8))
    os.symlink(root / "deleted.jpg", root / "gone.jpg")  # A dangling link: listed, unreadable.
    (root / "notes.txt").write_text("not listed: not an image extension")
    return str(root)


@pytest.fixture(scope="module")
def images_out(photos, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prepared") / "images")
    prepare_images(photos, out, 3, ImageSettings(min_side=32), PipelineOptions(IN_PROCESS))
    return out


def test_images_are_sharded_by_digest_with_bad_files_counted(photos, images_out):
    manifest = beam_io.read_manifest(images_out)
    assert manifest["summary"] == {"listed": 9, "written": 4, "skipped": {
        "unreadable": 1, "undecodable": 2, "too_small": 1, "duplicate": 1}}
    skipped = manifest["skipped"]
    assert [os.path.basename(p) for p in skipped["undecodable"]] == ["broken.jpg", "empty.png"]
    assert [os.path.basename(p) for p in skipped["unreadable"] + skipped["too_small"]] == ["gone.jpg", "tiny.png"]
    assert skipped["duplicate"] == [{"path": os.path.join(photos, "more", "coffee_again.png"),
                                     "same_as": os.path.join(photos, "coffee.png")}]
    shards = read_shards(images_out, "images", IMAGE_KEYS)
    assert [s["records"] for s in manifest["shards"]] == [len(s) for s in shards] and len(shards) == 3
    # Each photo once, its own bytes (not resized), in the shard of its digest, in digest order.
    settings = ImageSettings()
    for index, shard in enumerate(shards):
        digests = []
        for record in shard:
            name = record["image/filename"].decode()
            expected = prepare_image(os.path.join(photos, name), name, settings)
            assert record["image/encoded"] == expected.encoded == read(os.path.join(photos, name))
            assert beam_io.shard_of(expected.digest, 3) == index
            digests.append(expected.digest)
        assert digests == sorted(digests)
    assert sorted(r["image/filename"].decode() for s in shards for r in s) == sorted(PHOTOS)
    source = image_source(images_out, 32)
    assert source.kind == "tfrecords" and len(source.paths) == 3


def test_resizing_caps_pixels_keeps_aspect_and_reencodes(photos):
    rocket = os.path.join(photos, "rocket.jpg")
    original = decode_rgb(read(rocket), 1)
    small = cap_pixels(original, 50_000)
    assert small.shape[0] * small.shape[1] <= 50_000 and small.shape[0] * small.shape[1] > 49_000
    assert abs(small.shape[1] / small.shape[0] - original.shape[1] / original.shape[0]) < 0.01
    assert cap_pixels(original, 10 ** 7) is original
    prepared = prepare_image(rocket, "rocket.jpg", ImageSettings(max_pixels=50_000, jpeg_quality=90))
    assert prepared.format == "jpeg" and decode_rgb(prepared.encoded, 1).shape == small.shape
    assert prepare_image(rocket, "rocket.jpg", ImageSettings(min_side=300, max_pixels=50_000)) == "too_small"
    with pytest.raises(MtssError, match="max_pixels"):
        ImageSettings(min_side=32, max_pixels=100).validate()


@pytest.mark.slow
def test_two_worker_processes_write_the_same_bytes_quietly(photos, images_out, tmp_path, capfd):
    """Stable sharding: the output depends on the inputs only, not on the parallelism. The
    workers' INFO lines and TensorFlow's load notices stay out of the console."""
    other = str(tmp_path / "two")
    prepare.main(["prepare", "images", "--input", photos, "--output", other, "--shards", "3", "--min_side", "32",
                  *TWO_PROCESSES])
    printed = capfd.readouterr()
    assert f"images written to {other} in 3 shards" in printed.out
    assert not re.search(r"^(INFO|DEBUG):|\.cc:\d+\]|absl::InitializeLog|semi_persistent", printed.err, re.MULTILINE), \
        printed.err[:2000]
    assert sorted(os.listdir(other)) == sorted(os.listdir(images_out))
    for name in os.listdir(images_out):
        assert read(os.path.join(other, name)) == read(os.path.join(images_out, name)), name


def test_a_failed_run_keeps_the_earlier_output_and_a_rerun_replaces_it(photos, images_out, tmp_path, monkeypatch):
    out = str(tmp_path / "images")
    shutil.copytree(images_out, out)
    before = {name: read(os.path.join(out, name)) for name in os.listdir(out)}

    def fail(*args):
        raise RuntimeError("simulated crash before commit")

    with monkeypatch.context() as patch:
        patch.setattr(beam_io, "commit", fail)
        with pytest.raises(Exception, match="simulated crash"):
            prepare_images(photos, out, 2, ImageSettings(), PipelineOptions(IN_PROCESS))
    assert {name: read(os.path.join(out, name)) for name in before} == before
    assert any(name.startswith(beam_io.RUN_PREFIX) for name in os.listdir(out))  # Never read: no shard name.
    assert image_source(out, 32).paths == sorted(os.path.join(out, n) for n in before if n.endswith(".tfrecord"))

    manifest = prepare_images(photos, out, 2, ImageSettings(max_pixels=60_000), PipelineOptions(IN_PROCESS))
    assert sorted(os.listdir(out)) == ["images-00000-of-00002.tfrecord", "images-00001-of-00002.tfrecord",
                                       "manifest.json"]  # Old 3-shard files and the failed run's dir gone.
    records = [r for shard in read_shards(out, "images", IMAGE_KEYS) for r in shard]
    assert len(records) == manifest["summary"]["written"] == 4
    assert all(np.prod(decode_rgb(r["image/encoded"], 1).shape[:2]) <= 60_000 for r in records)


def test_bad_arguments_fail_before_any_work(photos, images_out, tmp_path):
    with pytest.raises(DataError, match="no images match /no/such/dir"):
        prepare_images("/no/such/dir/*.jpg", str(tmp_path / "x"), 2, ImageSettings(), PipelineOptions(IN_PROCESS))
    with pytest.raises(MtssError, match="--shards must be"):
        prepare_images(photos, str(tmp_path / "x"), 0, ImageSettings(), PipelineOptions(IN_PROCESS))
    with pytest.raises(MtssError, match=r"holds prepared images \(manifest.json\), not prepared masks"):
        prepare_masks.prepare_masks(clip.sample_clip_path(), images_out, 2, MaskSettings(max_frames=2),
                                    PipelineOptions(IN_PROCESS))
    assert beam_io.read_manifest(images_out)["kind"] == "images"
    videos = tmp_path / "videos"
    (videos / "a").mkdir(parents=True)
    (videos / "a" / "b.mp4").write_bytes(b"x")
    (videos / "a__b.mp4").write_bytes(b"x")
    with pytest.raises(DataError, match="would share the video id 'a__b'"):
        prepare_masks.prepare_masks(str(videos), str(tmp_path / "m"), 2, MaskSettings(), PipelineOptions(IN_PROCESS))
    assert not os.path.exists(tmp_path / "m")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> str:
    """The embedded clip and two videos that cannot be read."""
    root = tmp_path_factory.mktemp("videos")
    os.symlink(clip.sample_clip_path(), root / "street.mp4")
    (root / "bad").mkdir()
    (root / "bad" / "truncated.mp4").write_bytes(read(clip.sample_clip_path())[:5000])
    (root / "empty.avi").write_bytes(b"")
    return str(root)


@pytest.fixture(scope="module")
def masks_out(videos, tmp_path_factory) -> tuple[str, str]:
    """(Beam output by the command's main, in-process; its printed summary)."""
    out = str(tmp_path_factory.mktemp("prepared") / "masks")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        prepare.main(["prepare", "masks", "--videos", videos, "--output", out, "--shards", "3",
                      "--max_frames", str(CLIP_FRAMES), "--max_side", "320"] + IN_PROCESS)
    return out, printed.getvalue()


def test_beam_masks_equal_the_single_machine_extractor(videos, masks_out, tmp_path):
    out, printed = masks_out
    tool = str(tmp_path / "tool")
    tool_manifest = motion_masks.extract_directory(videos, tool, MaskSettings(max_frames=CLIP_FRAMES))
    manifest = beam_io.read_manifest(out)
    assert manifest["settings"] == tool_manifest["settings"]
    assert manifest["summary"] == tool_manifest["summary"]
    assert manifest["summary"]["ok"] == 1 and manifest["summary"]["skipped"] == 2
    assert manifest["videos"] == tool_manifest["videos"]  # Same records, incl. the skipped videos' errors.
    assert set(manifest["skipped_videos"]) == {"bad__truncated", "empty"}
    assert "skipped bad__truncated: " in printed and "1 ok, 2 skipped" in printed
    keys = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "mask/encoded": tf.io.FixedLenFeature([], tf.string),
            "video/id": tf.io.FixedLenFeature([], tf.string), "frame/number": tf.io.FixedLenFeature([], tf.int64)}
    shards = read_shards(out, "masks", keys)
    seen = []
    for record in (r for shard in shards for r in shard):
        name = f"{record['video/id'].decode()}/{record['frame/number']:06d}"
        seen.append(name)
        tool_mask = cv2.imread(os.path.join(tool, "masks", name + ".png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imdecode(np.frombuffer(record["mask/encoded"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, tool_mask), name
        assert record["image/encoded"] == read(os.path.join(tool, "frames", name + ".jpg")), name
    assert sorted(seen) == [f"street/{n:06d}" for n in tool_manifest["videos"]["street"]["frames"]]
    assert len(seen) == tool_manifest["summary"]["frames_kept"] > 0
    assert sum(1 for shard in shards if shard) > 1  # Frames spread over shards by their digest.


def test_command_line_settings_and_beam_options():
    args, rest = prepare._parser().parse_known_args(
        ["masks", "--videos", "v", "--output", "o", "--max_side", "0", "--flow", "farneback",
         "--min_foreground", "0.01", "--direct_num_workers=2"])
    settings = prepare._mask_settings(args)
    assert settings == MaskSettings(max_side=None, flow="farneback", min_foreground=0.01)
    options = prepare._beam_options(rest).get_all_options()
    assert options["direct_num_workers"] == 2 and options["runner"] == prepare.DEFAULT_RUNNER
    assert prepare._beam_options(["--runner=DataflowRunner"]).get_all_options()["runner"] == "DataflowRunner"


def test_a_video_failing_unexpectedly_is_recorded_not_raised(monkeypatch):
    def broken(path, settings):
        yield from ()
        raise ValueError("codec exploded")

    monkeypatch.setattr(motion_masks, "extract_video", broken)
    record, frames = prepare_masks.extract_record("/videos/x.mp4", "x.mp4", MaskSettings())
    assert frames == [] and record["status"] == "skipped" and record["frames_kept"] == 0
    assert record["error"] == "/videos/x.mp4: ValueError: codec exploded"


@pytest.mark.slow
def test_the_trainer_trains_from_both_outputs(images_out, masks_out, tmp_path):
    masks_dir, _ = masks_out
    assert mask_source(masks_dir).kind == "tfrecords"
    for task, data in (("rp", ["--data", images_out]), ("ms", ["--task_param", f"ms.data={masks_dir}"])):
        run = run_cli("mtss_train", "--tasks", task, "--smoke", "--max_steps", "2", "--train_dir",
                      str(tmp_path / task), "--task_param", f"{task}.batch_size=2", *data)
        assert run.returncode == 0, run.stderr
        assert "step 2/2" in run.stderr and f"{task}: loss" in run.stderr, run.stderr
        assert os.path.isfile(tmp_path / task / "model.ckpt-2.index")
