"""Nearest-neighbour retrieval pictures (mtss_train.eval.neighbours) and the plots they share."""

import json

import cv2
import numpy as np
import pytest

from mtss_train import loader
from mtss_train.compat import tf
from mtss_train.data.labelled import fit_square, open_labelled
from mtss_train.eval import features as feats
from mtss_train.eval import neighbours as nb
from mtss_train.eval import plots
from conftest import assert_one_line_error, run_cli
from test_eval import stripe_sets, tiny_ckpt, write_folders  # noqa: F401  Fixtures, shared with test_eval.


# Retrieval arithmetic.

def test_neighbours_are_by_cosine_most_similar_first_and_never_the_query_itself():
    features = np.array([[1, 0], [10, 0.5], [0, 1], [1, 1], [-1, 0]], np.float32)
    found, sims = nb.cosine_neighbours(features, np.array([0, 2]), k=3)
    # Row 1 is 10x longer than row 0 but points the same way: cosine, not distance, ranks it first.
    np.testing.assert_array_equal(found, [[1, 3, 2], [3, 1, 0]])
    np.testing.assert_allclose(sims[0], [10 / np.hypot(10, 0.5), np.sqrt(0.5), 0], atol=1e-6)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_precision_counts_matching_labels_and_chance_is_same_label_odds():
    labels = np.array([0, 0, 1, 1, 1])
    assert nb.precision_at_k(labels, np.array([0, 2]), np.array([[1, 2], [3, 4]])) == 0.75
    assert nb.chance_precision(labels) == pytest.approx((2 * 1 + 3 * 2) / (5 * 4))


def test_queries_are_fixed_take_the_classes_in_turn_and_come_sorted_by_label():
    labels = np.repeat([2, 0, 1], 20)
    queries = nb.choose_queries(labels, 6, seed=3)
    assert labels[queries].tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(queries, nb.choose_queries(labels, 6, seed=3))
    assert not np.array_equal(queries, nb.choose_queries(labels, 6, seed=4))
    unlabelled = nb.choose_queries(np.full(10, nb.UNLABELLED), 4)
    assert len(set(unlabelled.tolist())) == 4 and list(unlabelled) == sorted(unlabelled)


# Data: crops and unlabelled photos.

def test_crops_are_row_major_tiles_labelled_by_their_image(tmp_path):
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, [60, 80, 3]).astype(np.uint8) for _ in range(2)]
    for i, image in enumerate(originals):
        cv2.imwrite(str(tmp_path / f"{i}.png"), image[:, :, ::-1])
    data = nb.open_gallery(str(tmp_path), crops=2)
    assert isinstance(data, nb.Crops) and data.count() == 8 and data.count(5) == 5
    tiles = list(data.dataset(16).as_numpy_iterator())
    assert [int(label) for _, label in tiles] == [0] * 4 + [1] * 4
    whole = fit_square(originals[1], 32)
    for index, (row, column) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        np.testing.assert_array_equal(tiles[4 + index][0], whole[16 * row:16 * row + 16, 16 * column:16 * column + 16])
    assert len(list(data.dataset(16, limit=5))) == 5
    assert data.fingerprint() != nb.open_gallery(str(tmp_path), crops=3).fingerprint()  # Another cache key.


def test_a_folder_of_photos_is_unlabelled_and_class_folders_keep_their_labels(tmp_path, stripe_sets):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros([20, 20, 3], np.uint8))
    photos = nb.open_gallery(str(tmp_path))
    assert photos.kind == "images" and list(photos.labels) == [nb.UNLABELLED]
    assert nb.open_gallery(stripe_sets[1]).kind == "folders"
    assert nb.open_gallery(nb.SAMPLE).count() >= 10  # scikit-image's photos.


# The picture.

def test_mosaic_frames_neighbours_green_or_red_by_label_and_queries_blue():
    thumbs = {i: np.full([8, 8, 3], 10 * i, np.uint8) for i in range(5)}
    block = plots.NeighbourBlock("t", np.array([[1, 2], [0, 4]]), np.zeros([2, 2]))
    mosaic = plots.neighbours_mosaic(block, np.array([0, 3]), np.array([7, 7, 9, 9, 9]), thumbs)
    cell = 8 + 2 * plots.FRAME
    first, second = cell + plots.QUERY_GAP, cell + plots.QUERY_GAP + cell + plots.PAD
    row2 = cell + plots.PAD
    assert tuple(mosaic[0, 0]) == plots.QUERY_FRAME and tuple(mosaic[row2, 0]) == plots.QUERY_FRAME
    assert tuple(mosaic[0, first]) == plots.MATCH and tuple(mosaic[0, second]) == plots.MISMATCH  # 7=7, 7!=9.
    assert tuple(mosaic[row2, first]) == plots.MISMATCH and tuple(mosaic[row2, second]) == plots.MATCH
    np.testing.assert_array_equal(mosaic[row2 + plots.FRAME:row2 + plots.FRAME + 8,
                                         second + plots.FRAME:second + plots.FRAME + 8], thumbs[4])
    unlabelled = plots.neighbours_mosaic(block, np.array([0, 3]), None, thumbs)
    assert tuple(unlabelled[0, first]) == plots.NEUTRAL_FRAME


def test_run_writes_the_picture_and_the_json_from_cached_features(stripe_sets, tiny_ckpt, tmp_path, monkeypatch):
    data = open_labelled(stripe_sets[1])
    request = nb.Request(checkpoints=[tiny_ckpt, "random"], data=data, queries=3, k=4, precision_queries=45,
                         thumb_size=24, cache_dir=str(tmp_path / "cache"))
    settings = feats.Settings(image_size=48, grid=None)
    summary = nb.run(request, settings, str(tmp_path / "n.png"))
    picture = cv2.imread(str(tmp_path / "n.png"))
    assert picture is not None and picture.shape[1] > 2 * 5 * 24  # Two blocks of query + 4 neighbours.
    assert json.loads((tmp_path / "n.json").read_text()) == summary
    assert [q["label"] for q in summary["queries"]] == [0, 1, 2]  # One query per class.
    # The JSON's neighbours and precision are those of the cached features, for every checkpoint.
    for found in summary["checkpoints"]:
        model = loader.Trunk(found["checkpoint"], feats.Settings(trunk_size="tiny", image_size=48, grid=None))
        cached = feats.load_or_extract(model, data, settings, None, request.cache_dir, "")
        queries = np.array([q["index"] for q in summary["queries"]])
        np.testing.assert_array_equal(found["neighbours"], nb.cosine_neighbours(cached.features, queries, 4)[0])
        every = nb.cosine_neighbours(cached.features, np.arange(45), 4)[0]
        assert found["precision_at_k"] == pytest.approx(nb.precision_at_k(cached.labels, np.arange(45), every))
        assert found["neighbour_labels"] == cached.labels[found["neighbours"]].tolist()
    assert summary["checkpoints"][1]["trunk"] == "random init (seed 0)"  # `random` took the checkpoint's size.
    assert summary["chance_precision"] == pytest.approx(14 / 44)

    def no_trunk(self):
        raise AssertionError("the trunk ran on a cache hit")

    monkeypatch.setattr(loader.Trunk, "extractor", property(no_trunk))
    assert nb.run(request, settings, str(tmp_path / "again.png"))["checkpoints"] == summary["checkpoints"]


@pytest.mark.slow
def test_bad_requests_are_one_line_errors(stripe_sets, tmp_path):
    data = open_labelled(stripe_sets[1])
    with pytest.raises(nb.MtssError, match="--out must name a .png"):
        nb.run(nb.Request(["random"], data), feats.Settings(), str(tmp_path / "n.jpg"))
    with pytest.raises(nb.MtssError, match="--k must be positive"):
        nb.run(nb.Request(["random"], data, k=0), feats.Settings(), str(tmp_path / "n.png"))
    tiny = write_folders(tmp_path / "few", 1, seed=0)
    with pytest.raises(nb.DataError, match="3 usable images: --k 8 neighbours need at least 9"):
        nb.run(nb.Request(["random"], open_labelled(tiny), cache_dir=None), feats.Settings(trunk_size="tiny",
                                                                                           image_size=32),
               str(tmp_path / "n.png"))
    result = run_cli("mtss_train.eval.neighbours", "--checkpoint", "random", "--data", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "n.png"))
    assert_one_line_error(result, "nowhere does not exist")


@pytest.mark.slow
def test_command_line_on_the_bundled_photos_cut_into_crops(tmp_path):
    out = tmp_path / "sample.png"
    result = run_cli("mtss_train.eval.neighbours", "--checkpoint", "random", "--trunk_size", "tiny",
                     "--data", "sample", "--crops", "2", "--queries", "3", "--k", "3", "--image_size", "32",
                     "--cache_dir", "", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["data_kind"] == "crops" and summary["features"]["grid"] == "global"
    assert 0 <= summary["checkpoints"][0]["precision_at_k"] <= 1 and "precision@3" in result.stderr
    assert cv2.imread(str(out)) is not None


# During training: the eval/neighbours picture.

def test_training_picture_of_photo_tiles_is_written_to_tensorboard(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):  # Each photo one flat colour: its 4 tiles are alike, other photos' are not.
        cv2.imwrite(str(tmp_path / f"p{i}.png"), np.zeros([40, 40, 3], np.uint8) + rng.integers(0, 256, 3, np.uint8))
    drawer = nb.training_neighbours(str(tmp_path), "tiny")
    assert isinstance(drawer.data, nb.Crops) and drawer.labels.tolist() == np.repeat(range(4), 4).tolist()

    def colour_block3(images):  # A "trunk" whose features are the mean colour: tiles of one photo match.
        return tf.reduce_mean(images, axis=[1, 2], keepdims=True)

    writer = tf.summary.create_file_writer(str(tmp_path / "logs"))
    drawer.write(writer, 7, colour_block3)
    writer.flush()
    events = [e for f in (tmp_path / "logs").iterdir() for e in tf.compat.v1.train.summary_iterator(str(f))]
    values = {v.tag: v for e in events for v in e.summary.value if e.step == 7}
    # k = 6 > the 3 other tiles of a photo: at best 3 of 6 neighbours share its photo.
    assert tf.make_ndarray(values["eval/neighbours/precision_at_k"].tensor) == pytest.approx(0.5)
    picture = tf.io.decode_png(tf.make_ndarray(values["eval/neighbours"].tensor)[2]).numpy()
    assert picture.ndim == 3 and picture.shape[1] > 7 * 48


def test_no_training_picture_for_data_it_cannot_show(tmp_path, caplog):
    from test_eval import write_records
    records = write_records(tmp_path / "u.tfrecord", [{"image/encoded": b"x"}])  # Images without labels.
    assert nb.training_neighbours(records, "tiny") is None
    assert "no eval/neighbours picture" in caplog.text


@pytest.mark.slow
def test_training_with_eval_data_shows_the_neighbours_picture(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "eval").mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "eval" / f"{i}.png"), rng.integers(0, 256, [96, 96, 3]).astype(np.uint8))
    result = run_cli("mtss_train", "--tasks", "ex", "--smoke", "--max_steps", "2", "--save_every_steps", "2",
                     "--train_dir", str(tmp_path / "run"), "--eval_data", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    events = [e for f in (tmp_path / "run" / "logs").rglob("events*")
              for e in tf.compat.v1.train.summary_iterator(str(f))]
    tags = {(e.step, v.tag) for e in events for v in e.summary.value}
    assert {(2, "eval/neighbours"), (2, "eval/neighbours/precision_at_k")} <= tags
