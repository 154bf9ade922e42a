"""Features for TensorBoard's embedding projector, read back by the projector plugin itself."""

import cv2
import numpy as np
import pytest
from tensorboard.plugins import base_plugin
from tensorboard.plugins.projector import projector_plugin
from werkzeug.test import Client

from mtss_train.data.labelled import open_labelled
from mtss_train.eval import features as feats
from conftest import assert_one_line_error, run_cli
from test_eval import write_folders


def served(plugin: projector_plugin.ProjectorPlugin, route: str, **query: str) -> bytes:
    """What the plugin's HTTP route answers, as TensorBoard's browser page would ask it."""
    response = Client(plugin.get_plugin_apps()[route]).get("/", query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data()


def test_the_projector_plugin_reads_features_labels_and_sprite(tmp_path):
    data = open_labelled(write_folders(tmp_path / "images", 2, seed=0))  # 6 images, 3 classes.
    rng = np.random.default_rng(0)
    labels = np.array([label for _, label in data.dataset(8).as_numpy_iterator()])
    found = feats.Extracted(rng.normal(size=[6, 5]).astype(np.float32), labels, {"checkpoint": "random init (seed 0)"})
    logdir = tmp_path / "logdir"
    feats.write_projector(found, data, str(logdir), thumb_size=10)

    plugin = projector_plugin.ProjectorPlugin(base_plugin.TBContext(logdir=str(logdir), data_provider=None))
    plugin._update_configs()  # What the plugin does before answering any request.
    config = plugin._configs["."]  # The log directory itself is the run.
    (embedding,) = config.embeddings
    assert list(embedding.tensor_shape) == [6, 5] and embedding.tensor_name == "block3 random init (seed 0)"

    tensor = np.frombuffer(served(plugin, "/tensor", run=".", name=embedding.tensor_name), np.float32)
    np.testing.assert_allclose(tensor.reshape(6, 5), found.features, rtol=1e-5)
    rows = served(plugin, "/metadata", run=".", name=embedding.tensor_name).decode().splitlines()
    assert rows[0] == "index\tlabel\tclass"
    assert [row.split("\t")[2] for row in rows[1:]] == [data.classes[l] for l in found.labels]

    sprite = cv2.imdecode(np.frombuffer(served(plugin, "/sprite_image", run=".", name=embedding.tensor_name), np.uint8),
                          cv2.IMREAD_COLOR)[:, :, ::-1]
    assert list(embedding.sprite.single_image_dim) == [10, 10] and sprite.shape == (30, 30, 3)  # 3 x 3 grid.
    images = feats.images_at(data, list(range(6)), 10)
    np.testing.assert_array_equal(sprite[10:20, 20:30], images[5])  # Image 5: row 1, column 2.


def test_the_sprite_shrinks_to_the_projectors_size_limit(tmp_path, monkeypatch):
    data = open_labelled(write_folders(tmp_path / "images", 2, seed=0))
    found = feats.Extracted(np.zeros([6, 2], np.float32), np.zeros(6, np.int64), {})
    monkeypatch.setattr(feats, "SPRITE_MAX_SIDE", 20)  # 3 images a side: at most 6 px each.
    feats.write_projector(found, data, str(tmp_path / "logdir"), thumb_size=48)
    assert cv2.imread(str(tmp_path / "logdir" / "sprite.png")).shape == (18, 18, 3)


@pytest.mark.slow
def test_features_command_writes_the_projector_files_and_needs_an_output(tmp_path):
    images = write_folders(tmp_path / "images", 2, seed=0)
    result = run_cli("mtss_train.eval.features", "--checkpoint", "random", "--trunk_size", "tiny", "--data", images)
    assert_one_line_error(result, "nothing to write", "--projector")
    result = run_cli("mtss_train.eval.features", "--checkpoint", "random", "--trunk_size", "tiny", "--data", images,
                     "--image_size", "32", "--grid", "global", "--cache_dir", "", "--projector", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(feats.PROJECTOR_FILES)
    assert np.loadtxt(tmp_path / "p" / "features.tsv").shape == (6, 128)  # Tiny trunk: 128 channels.
