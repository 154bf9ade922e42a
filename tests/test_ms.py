"""Motion segmentation: the frames + masks source, augmentation, loss and metrics, training
(ms beside the other tasks: test_multitask)."""

import json
import math
import os

import cv2
import numpy as np
import pytest

from mtss_train.compat import tf
from mtss_train.data.masks import TFRECORD_FRAME_KEY, TFRECORD_MASK_KEY, MaskSource, mask_source
from mtss_train.errors import DataError, MtssError
from mtss_train.task import make_config, task_class
from mtss_train.tasks.ms import MotionSegmentation, downsample_mask, mask_metrics, weighted_sigmoid_loss
from mtss_train.train.config import TrainConfig
from mtss_train.train.trainer import EVAL_SEED, Trainer
from test_settings import parse


def write_extracted(root, videos: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> str:
    """A directory in the extractor's format: frames/<video>/<n>.jpg, masks/<video>/<n>.png."""
    stats = {}
    for video, pairs in videos.items():
        for kind in ("frames", "masks"):
            os.makedirs(os.path.join(root, kind, video), exist_ok=True)
        for n, (frame, mask) in enumerate(pairs):
            assert cv2.imwrite(os.path.join(root, "frames", video, f"{n:06d}.jpg"),
                               cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert cv2.imwrite(os.path.join(root, "masks", video, f"{n:06d}.png"), mask)
        stats[video] = {"frames_kept": len(pairs)}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"settings": {}, "videos": stats}, f)
    return str(root)


def numbered_pair(k: int, height: int = 40, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Frame k is flat grey 10 + 20k; its mask is a rectangle 4(k + 1) px wide."""
    frame = np.full([height, width, 3], 10 + 20 * k, np.uint8)
    mask = np.zeros([height, width], np.uint8)
    mask[5:15, : 4 * (k + 1)] = 255
    return frame, mask


def identify(example: dict) -> int:
    """Which numbered_pair an example is, checking that frame and mask agree."""
    frame, mask = example["frame"].numpy(), example["mask"].numpy()
    assert frame.dtype == np.uint8 and mask.dtype == np.uint8 and mask.shape == frame.shape[:2] + (1,)
    assert set(np.unique(mask)) <= {0, 255}
    k = int(round((frame.mean() - 10) / 20))
    assert mask[10, :, 0].sum() // 255 == 4 * (k + 1), "frame paired with another frame's mask"
    return k


@pytest.fixture
def six_frames(tmp_path):
    """Two videos of three numbered frames each: 0-2 in 'a', 3-5 in 'b'."""
    return write_extracted(tmp_path / "out", {
        "a": [numbered_pair(k) for k in range(3)], "b": [numbered_pair(k) for k in range(3, 6)],
    })


def ids(source: MaskSource, count: int, seed: int = 0, shard=(1, 0)) -> list[int]:
    return [identify(e) for e in source.dataset(seed, shard).take(count)]


def test_frames_pair_with_their_masks_and_every_epoch_covers_all(six_frames):
    source = mask_source(six_frames)
    order = ids(source, 12)
    assert sorted(order[:6]) == list(range(6)) and sorted(order[6:]) == list(range(6))
    assert source.skipped.count == 0 and source.path == six_frames


@pytest.mark.slow
def test_order_is_shuffled_per_seed(six_frames):
    source = mask_source(six_frames)
    first = ids(source, 12, seed=1)
    assert ids(source, 12, seed=1) == first
    assert ids(source, 12, seed=2) != first
    assert first[:6] != first[6:]  # Reshuffled every epoch.


@pytest.mark.slow
def test_shards_split_the_pairs(six_frames):
    source = mask_source(six_frames)
    shards = [set(ids(source, 9, shard=(2, i))) for i in range(2)]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(6))
    assert all(len(s) == 3 for s in shards)
    many = [set(ids(source, 6, seed=0, shard=(8, i))) for i in (0, 7)]  # More shards than pairs:
    assert many == [set(range(6))] * 2  # each reads all.


@pytest.mark.slow
def test_bad_and_unpaired_files_are_skipped_and_counted_once(six_frames):
    root = six_frames
    (open(os.path.join(root, "frames", "a", "000001.jpg"), "wb")).write(b"\xff\xd8 not a jpeg")
    (open(os.path.join(root, "masks", "b", "000002.png"), "wb")).write(b"")  # Unreadable mask.
    assert cv2.imwrite(os.path.join(root, "masks", "b", "000001.png"), np.zeros([20, 20], np.uint8))  # Wrong size.
    frame, mask = numbered_pair(0)
    cv2.imwrite(os.path.join(root, "frames", "a", "000099.jpg"), frame)  # No mask.
    os.makedirs(os.path.join(root, "masks", "c"))
    cv2.imwrite(os.path.join(root, "masks", "c", "000000.png"), mask)  # No frame.
    source = mask_source(root)
    assert source.skipped.count == 2  # The unpaired ones, counted at open time.
    seen = ids(source, 15)  # Five epochs of the three good pairs.
    assert set(seen) == {0, 2, 3}
    assert source.skipped.count == 5
    assert source.skipped._keys >= {
        os.path.join(root, "frames", "a", "000001.jpg"), os.path.join(root, "masks", "b", "000001.png"),
        os.path.join(root, "masks", "b", "000002.png"), os.path.join(root, "frames", "a", "000099.jpg"),
    }


def test_missing_and_unpaired_data_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="/no/such/masks does not exist"):
        mask_source("/no/such/masks")
    (tmp_path / "frames").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path} has no masks/ directory"):
        mask_source(str(tmp_path))
    frame, mask = numbered_pair(0)
    os.makedirs(tmp_path / "frames" / "v")
    os.makedirs(tmp_path / "masks" / "w")
    cv2.imwrite(str(tmp_path / "frames" / "v" / "000000.jpg"), frame)
    cv2.imwrite(str(tmp_path / "masks" / "w" / "000000.png"), mask)
    with pytest.raises(DataError, match=r"no frame in .*frames has a mask in .*masks \(1 frame\(s\), 1 mask\(s\)\)"):
        mask_source(str(tmp_path))


@pytest.mark.slow
def test_all_corrupt_pairs_fail_at_open_time(tmp_path):
    root = write_extracted(tmp_path, {"v": [numbered_pair(0), numbered_pair(1)]})
    for n in range(2):
        open(os.path.join(root, "masks", "v", f"{n:06d}.png"), "wb").write(b"garbage")
    with pytest.raises(DataError, match=f"none of the 2 frame/mask pairs in {root}"):
        mask_source(root)


def encoded(image: np.ndarray, extension: str) -> bytes:
    return cv2.imencode(extension, image)[1].tobytes()


def write_pair_records(path, numbers: list[int]) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for k in numbers:
            frame, mask = numbered_pair(k)
            feature = {
                TFRECORD_FRAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded(frame, ".jpg")])),
                TFRECORD_MASK_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded(mask, ".png")])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.mark.slow
def test_tfrecords_of_frames_and_masks_shard_by_file(tmp_path):
    write_pair_records(tmp_path / "a.tfrecord", [1, 4])
    write_pair_records(tmp_path / "b.tfrecord", [2])
    source = mask_source(str(tmp_path))
    assert sorted(ids(source, 6)) == [1, 1, 2, 2, 4, 4]
    assert [set(ids(source, 4, shard=(2, i))) for i in range(2)] == [{1, 4}, {2}]


def test_tfrecords_without_a_usable_pair_fail_fast(tmp_path):
    write_pair_records(tmp_path / "a.tfrecord", [])
    with pytest.raises(DataError, match="none of the 1 TFRecord file"):
        mask_source(str(tmp_path))


@pytest.mark.slow
def test_a_truncated_tfrecord_file_of_pairs_gives_its_whole_records_and_is_counted_once(tmp_path):
    write_pair_records(tmp_path / "a.tfrecord", [1, 2, 3])
    path = tmp_path / "a.tfrecord"
    whole = os.path.getsize(path)
    os.truncate(path, whole - 100)  # The last record loses its end.
    source = mask_source(str(tmp_path))
    assert sorted(ids(source, 6)) == [1, 1, 1, 2, 2, 2]  # Three epochs of the two whole records.
    [(key, reason)] = source.skipped.reasons().items()
    assert key == str(path) and reason.startswith("truncated or corrupt TFRecord file (read 2 records, ")
    assert reason.endswith(f" of its {whole - 100} bytes; the rest is lost)")


# -- augmentation -------------------------------------------------------------------------
def ms_task(**overrides: str) -> MotionSegmentation:
    return MotionSegmentation(make_config(MotionSegmentation, {"crop": "64", "head_width": "16", **overrides}))


def test_crop_and_flip_move_frame_and_mask_together():
    # Foreground exactly where the frame is bright: any misalignment shows as disagreement.
    rng = np.random.RandomState(0)
    mask = (cv2.resize(rng.rand(12, 16), (160, 120), interpolation=cv2.INTER_NEAREST) > 0.6).astype(np.uint8) * 255
    frame = np.repeat(mask[..., None] // 255 * 200 + 20, 3, -1).astype(np.uint8)
    flipping, still = ms_task(min_scale="0.3", max_scale="1"), ms_task(min_scale="0.3", max_scale="1", flip="false")
    flipped = []
    for i in range(12):
        seed = tf.constant([3, i], tf.int64)
        example = flipping.make_example(tf.constant(frame), tf.constant(mask[..., None]), seed)
        image, target = example["frame"].numpy(), example["mask"].numpy()
        assert image.shape == (64, 64, 3) and target.shape == (64, 64, 1)
        assert 0 <= target.min() and target.max() <= 1
        np.testing.assert_allclose((image[..., 0] - 20) / 200, target[..., 0], atol=0.02)
        # Same seed, flip off: the same window, mirrored or not.
        unflipped = still.make_example(tf.constant(frame), tf.constant(mask[..., None]), seed)["frame"].numpy()
        assert np.array_equal(image, unflipped) or np.array_equal(image, unflipped[:, ::-1])
        flipped.append(not np.array_equal(image, unflipped))
    assert 0 < sum(flipped) < 12


def test_crop_scale_follows_the_setting():
    # A 20x20 foreground square: its area in the crop is 400 (crop / window side)^2 when in view.
    frame = np.zeros([100, 100, 3], np.uint8)
    mask = np.zeros([100, 100, 1], np.uint8)
    mask[40:60, 40:60] = 255

    def areas(scale: str) -> list[float]:
        task = ms_task(min_scale=scale, max_scale=scale, flip="false")
        return [float(tf.reduce_sum(task.make_example(tf.constant(frame), tf.constant(mask),
                                                      tf.constant([0, i], tf.int64))["mask"])) for i in range(20)]

    assert areas("1") == pytest.approx([400 * 0.64**2] * 20, rel=0.01)  # The whole frame.
    half = areas("0.5")
    assert max(half) == pytest.approx(400 * 1.28**2, rel=0.01) and min(half) < max(half)  # Moves around.


@pytest.mark.slow
def test_pipeline_batches_and_is_deterministic_per_seed(six_frames):
    task = ms_task()
    source = mask_source(six_frames)

    def batches(seed: int) -> list[dict]:
        return [{k: v.numpy() for k, v in b.items()} for b in task.make_dataset(source.dataset(seed), 4, seed).take(2)]

    first = batches(5)
    assert first[0]["frame"].shape == (4, 64, 64, 3) and first[0]["mask"].shape == (4, 64, 64, 1)
    assert first[0]["frame"].dtype == np.float32 and first[0]["mask"].dtype == np.float32
    for a, b in zip(first, batches(5)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["frame"], batches(6)[0]["frame"])
    assert task.trunk_images(first[0]).shape == (4, 64, 64, 3)


# -- loss and metrics -----------------------------------------------------------------------
def grid(*rectangles: tuple[int, int, int, int], size: int = 8) -> np.ndarray:
    """[1, size, size, 1] float32 with ones inside each (top, left, bottom, right) rectangle."""
    out = np.zeros([1, size, size, 1], np.float32)
    for top, left, bottom, right in rectangles:
        out[0, top:bottom, left:right] = 1
    return out


def logits_of(mask: np.ndarray) -> tf.Tensor:
    return tf.constant(np.where(mask > 0, 3.0, -3.0), tf.float32)


def test_iou_and_pixel_accuracy_of_two_rectangles():
    predicted, target = grid((0, 0, 4, 4)), grid((2, 2, 6, 6))  # 16 px each, 4 px overlap.
    metrics = mask_metrics(logits_of(predicted), tf.constant(target))
    assert float(metrics["iou"][0]) == pytest.approx(4 / 28)
    assert float(metrics["pixel_accuracy"][0]) == pytest.approx((64 - 24) / 64)


@pytest.mark.parametrize("predicted, target, iou, accuracy", [
    (grid(), grid(), 1.0, 1.0),  # Nothing moves, nothing claimed.
    (grid(), grid((0, 0, 2, 8)), 0.0, 48 / 64),  # The all-background predictor misses it all.
    (grid((0, 0, 8, 8)), grid((0, 0, 2, 8)), 16 / 64, 16 / 64),
    (grid((1, 1, 3, 3)), grid((1, 1, 3, 3)), 1.0, 1.0),
])
def test_metrics_edge_cases(predicted, target, iou, accuracy):
    metrics = mask_metrics(logits_of(predicted), tf.constant(target))
    assert float(metrics["iou"][0]) == pytest.approx(iou)
    assert float(metrics["pixel_accuracy"][0]) == pytest.approx(accuracy)


def test_metrics_are_per_example_and_threshold_soft_targets_at_one_half():
    target = np.concatenate([grid((0, 0, 4, 4)) * 0.6, grid((0, 0, 4, 4)) * 0.4])  # In / out of the mask.
    logits = tf.constant(np.concatenate([logits_of(grid((0, 0, 4, 4)))] * 2))
    metrics = mask_metrics(logits, tf.constant(target))
    np.testing.assert_allclose(metrics["iou"].numpy(), [1.0, 0.0])
    np.testing.assert_allclose(metrics["pixel_accuracy"].numpy(), [1.0, 48 / 64])


def test_pooled_iou_weights_each_example_by_its_union():
    predicted = np.concatenate([grid((0, 0, 4, 4)), grid(), grid((0, 0, 4, 4))])
    target = np.concatenate([grid((2, 2, 6, 6)), grid(), grid((0, 0, 4, 4))])
    values, weights = mask_metrics(logits_of(predicted), tf.constant(target))["pooled_iou"]
    np.testing.assert_allclose(weights.numpy(), [28, 0, 16])  # Unions; the empty pair has no say.
    # As the trainer reports a weighted metric: sum(values * weights) / sum(weights).
    pooled = float(tf.reduce_sum(values * weights) / tf.reduce_sum(weights))
    assert pooled == pytest.approx((4 + 16) / (28 + 16))
    all_background = mask_metrics(logits_of(np.zeros_like(target)), tf.constant(target))["pooled_iou"]
    assert float(tf.reduce_sum(all_background[0] * all_background[1])) == 0


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_weighted_sigmoid_loss_by_hand():
    # 2x2 map: foreground at (0, 0); logits 0, 0, 2, -2.
    logits = tf.constant([[[[0.0], [0.0]], [[2.0], [-2.0]]]])
    target = tf.constant([[[[1.0], [0.0]], [[0.0], [0.0]]]])
    pixel = [math.log(2), math.log(2), softplus(2), softplus(-2)]  # -log(1 - sigmoid(z)) = softplus(z).
    plain = weighted_sigmoid_loss(logits, target, 1.0)
    assert float(plain[0]) == pytest.approx(sum(pixel) / 4, rel=1e-6)
    weighted = weighted_sigmoid_loss(logits, target, 3.0)
    assert float(weighted[0]) == pytest.approx((3 * pixel[0] + sum(pixel[1:])) / 6, rel=1e-6)


def test_target_is_the_foreground_fraction_of_each_cell():
    mask = np.zeros([1, 8, 8, 1], np.float32)
    mask[0, :4, :2] = 1  # Half of the top-left 4x4 cell.
    mask[0, 4:, 4:] = 1  # All of the bottom-right one.
    np.testing.assert_allclose(downsample_mask(tf.constant(mask), [2, 2]).numpy()[0, ..., 0], [[0.5, 0], [0, 1]])


def test_loss_uses_the_logit_grid_and_casts_reduced_precision():
    task = ms_task()
    mask = np.zeros([2, 64, 64, 1], np.float32)
    mask[0, :32, :32] = 1  # Top-left cell of a 2x2 grid.
    logits = tf.constant(np.array([[[3.0], [-3.0]], [[-3.0], [-3.0]]])[None].repeat(2, 0), tf.float16)
    per_example, metrics = task.loss({"logits": logits}, {"mask": tf.constant(mask)})
    assert per_example.dtype == tf.float32 and per_example.shape == (2,)
    np.testing.assert_allclose(metrics["iou"].numpy(), [1.0, 0.0])
    np.testing.assert_allclose(per_example.numpy(), [softplus(-3), (3 * softplus(-3) + softplus(3)) / 4], rtol=1e-3)


def test_image_summaries_show_frame_prediction_and_target_side_by_side():
    task = ms_task()
    batch = {"frame": tf.fill([5, 64, 64, 3], 255.0), "mask": tf.zeros([5, 64, 64, 1])}
    logits = tf.concat([tf.fill([5, 4, 2, 1], 9.0), tf.fill([5, 4, 2, 1], -9.0)], axis=2)
    picture = task.image_summaries(batch, {"logits": logits})["frame_predicted_target"].numpy()
    assert picture.shape == (4, 64, 192, 3) and picture.min() >= 0 and picture.max() <= 1
    np.testing.assert_allclose(picture[:, :, :64], 1.0)  # Frame.
    np.testing.assert_allclose(picture[:, :, 64:96], 1.0, atol=1e-3)  # Predicted left half.
    np.testing.assert_allclose(picture[:, :, 96:192], 0.0, atol=1e-3)  # Right half, empty target.


def test_head_gives_one_logit_per_block3_cell():
    with tf.Graph().as_default():
        block3 = tf.compat.v1.placeholder(tf.float32, [3, 14, 14, 128])
        logits = ms_task().head(block3, {}, {}, is_training=False)["logits"]
    assert logits.shape.as_list() == [3, 14, 14, 1]


@pytest.mark.parametrize("field, value, fragment", [
    ("crop", "100", "multiple of 32"), ("min_scale", "0", "min_scale"), ("max_scale", "1.5", "max_scale"),
    ("foreground_weight", "0", "foreground_weight"), ("head_width", "0", "head_width"),
])
def test_bad_settings_are_rejected(field, value, fragment):
    with pytest.raises(MtssError, match=fragment):
        ms_task(**{field: value})


def test_registered_under_ms():
    assert task_class("ms") is MotionSegmentation
    assert MotionSegmentation.source_kind == "motion_masks" and MotionSegmentation.Config().output_stride == 16


# -- training -------------------------------------------------------------------------------
def scene(rng: np.random.RandomState, height: int = 96, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A textured frame with one red disk of random size and place; the disk is the mask."""
    background = cv2.resize(rng.uniform(40, 200, [height // 8, width // 8, 3]).astype(np.float32),
                            (width, height), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, [height, width, 3])
    mask = np.zeros([height, width], np.uint8)
    radius = rng.randint(14, 26)
    cv2.circle(mask, (rng.randint(radius, width - radius), rng.randint(radius, height - radius)), radius, 255, -1)
    disk = np.array([220.0, 40.0, 40.0]) + rng.normal(0, 15, [height, width, 3])
    return np.clip(np.where(mask[..., None] > 0, disk, background), 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, str]:
    """Extracted-mask directories of synthetic scenes: 'train' (4 videos) and 'held_out'."""
    rng = np.random.RandomState(0)
    root = tmp_path_factory.mktemp("scenes")
    return {
        "train": write_extracted(root / "train", {f"v{v}": [scene(rng) for _ in range(16)] for v in range(4)}),
        "held_out": write_extracted(root / "held_out", {"h": [scene(rng) for _ in range(16)]}),
    }


@pytest.mark.slow
def test_ms_beats_the_all_background_predictor_on_held_out_frames(tmp_path, scenes):
    """A test-sized run (tiny trunk, 60 steps of 16 crops at 96 px: 6x6 logits) learns to
    segment the disks of frames it never saw. Evaluated in inference mode on fixed batches."""

    ms = {"data": scenes["train"], "eval_data": scenes["held_out"], "crop": "96", "batch_size": "16",
          "head_width": "32", "min_scale": "0.7"}
    trainer = Trainer(TrainConfig(
        train_dir=str(tmp_path), tasks=["ms"], task_params={"ms": ms}, trunk_size="tiny", max_steps=60,
        learning_rate=1e-3, rmsprop_epsilon=1e-3, batch_norm_decay=0.9, save_every_steps=60,
        summary_every_steps=60,
    ))
    batches = 10
    # The all-background predictor on the very batches evaluate() reads: IoU 1 where the
    # target grid is empty, else 0.
    held_out = trainer.iterators(trainer.eval_sources, EVAL_SEED)["ms"]
    background = []
    for batch in [next(held_out) for _ in range(batches)]:
        target = downsample_mask(batch["mask"], [6, 6])
        background.append(mask_metrics(tf.fill(tf.shape(target), -1.0), target)["iou"].numpy())
    background_iou = float(np.mean(background))
    trainer.train()
    trained = trainer.evaluate(trainer.eval_sources, batches)["ms"]
    assert background_iou < 0.1, background_iou  # Nearly every crop shows some of its disk.
    assert trained["iou"] > background_iou + 0.4, (background_iou, trained)
    assert trained["pooled_iou"] > 0.5 and trained["pixel_accuracy"] > 0.9, trained  # Pooled: 0 for background.


@pytest.mark.slow
def test_embedded_default_is_the_sample_clip():
    pytest.importorskip("mtss_train.data.clip")
    source = ms_task().open_source(None)
    masks = [example["mask"].numpy() for example in source.dataset(seed=0).take(8)]
    assert all(set(np.unique(m)) <= {0, 255} for m in masks) and any(m.any() for m in masks)
    assert "sample clip" in source.path


def test_missing_ms_data_is_one_clear_error_at_start(tmp_path):
    with pytest.raises(DataError, match="motion-mask data /no/such/clips does not exist"):
        Trainer(parse("--train_dir", str(tmp_path), "--smoke", "--tasks", "ms", "--task_param", "ms.data=/no/such/clips"))
