"""Task balancing (`--balance`): the methods' arithmetic against the papers' definitions, and
each method training, checkpointing, resuming and drawing itself on the tiny trunk."""

import glob
import os

import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files
from mtss_train.compat import tf
from mtss_train.errors import MtssError
from mtss_train.train import balance, trainer
from mtss_train.train.config import TrainConfig

TINY_RP = {"patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32", "batch_size": "4"}
TINY_COL = {"batch_size": "4", "crop": "64", "resize_side": "96"}


def config(train_dir, method: str, **settings) -> TrainConfig:
    """rp and col on the bundled photos, trained together by `method`."""
    return TrainConfig(**{"train_dir": str(train_dir), "tasks": ["rp", "col"], "trunk_size": "tiny",
                          "schedule": "all", "balance": method, "max_steps": 2, "summary_every_steps": 1,
                          "save_every_steps": 2, "log_every_steps": 1, "batch_norm_decay": 0.9,
                          "task_params": {"rp": TINY_RP, "col": TINY_COL}, **settings})


def tensorboard(train_dir) -> tuple[dict[str, dict[int, float]], set[str]]:
    """(scalars {tag: {step: value}}, image tags) of a run."""
    scalars, images = {}, set()
    for path in glob.glob(os.path.join(train_dir, "logs", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "images":
                    images.add(value.tag)
                elif array.ndim == 0:
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
    return scalars, images


def pcgrad_by_the_paper(gradients: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Algorithm 1 of Yu et al. on explicit vectors, tasks met in `orders`."""
    projected = []
    for i, own in enumerate(gradients):
        g = own.copy()
        for j in orders[i]:
            if j != i and g @ gradients[j] < 0:
                g -= (g @ gradients[j]) / (gradients[j] @ gradients[j]) * gradients[j]
        projected.append(g)
    return np.sum(projected, axis=0)


@pytest.mark.parametrize("step", [0, 7])
def test_pcgrad_on_the_gram_matrix_gives_the_papers_update(step):
    rng = np.random.default_rng(step)
    gradients = rng.normal(size=(4, 50))
    gradients[1] = -0.8 * gradients[0] + 0.3 * rng.normal(size=50)  # Two tasks that conflict.
    gram = tf.constant(gradients @ gradients.T, tf.float32)
    coefficients = balance.projected_coefficients(gram, seed=3, step=tf.constant(step)).numpy()
    orders = balance.task_orders(4, 3, tf.constant(step)).numpy()
    assert sorted(orders[0]) == [0, 1, 2, 3]
    expected = pcgrad_by_the_paper(gradients, orders)
    np.testing.assert_allclose(coefficients @ gradients, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected, gradients.sum(axis=0))  # The projection did something.
    aligned = np.abs(gradients)  # No conflicts: PCGrad is the plain sum.
    np.testing.assert_allclose(balance.projected_coefficients(
        tf.constant(aligned @ aligned.T, tf.float32), 3, tf.constant(step)).numpy(), np.ones(4))


def test_the_cosine_picture_is_blue_where_gradients_agree_red_where_they_conflict_white_between():
    shown = balance.picture(tf.constant([[1.0, -0.3, 0.0], [-0.3, 1.0, 0.125], [0.0, 0.125, 1.0]]), pixels_per_cell=2)
    assert shown.shape == (1, 6, 6, 3)
    cell = lambda i, j: shown[0, 2 * i, 2 * j].numpy().tolist()  # noqa: E731
    assert cell(0, 0) == [0, 0, 1] and cell(1, 0) == [1, 0, 0] and cell(0, 2) == [1, 1, 1]
    assert cell(1, 2) == pytest.approx([0.5, 0.5, 1.0])  # Half of FULL_COLOUR_COSINE.


@pytest.mark.parametrize("settings, message", [
    ({"schedule": "round_robin"}, "--balance pcgrad balances the tasks a step trains together: it needs --schedule all"),
    ({"tasks": ["rp"], "task_params": {}}, "needs --schedule all and two tasks or more"),
    ({"strategy": "parameter_server"}, "--balance pcgrad cannot run under --strategy parameter_server"),
    ({"gradnorm_alpha": -1.0}, "--gradnorm_alpha >= 0"),
])
def test_a_balance_that_cannot_hold_is_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(MtssError, match=message):
        config(tmp_path, "pcgrad", **settings).validate()


@pytest.mark.parametrize("method, learned", [
    ("uncertainty", ["balance/col/log_variance", "balance/rp/log_variance"]),
    ("gradnorm", ["balance/col/initial_loss", "balance/col/weight", "balance/rp/initial_loss", "balance/rp/weight"]),
    ("pcgrad", []),
])
@pytest.mark.slow
def test_each_balance_trains_is_checkpointed_outside_the_trunk_resumes_and_shows_in_tensorboard(
        tmp_path, method, learned):
    first = trainer.Trainer(config(tmp_path, method, max_steps=1, save_every_steps=1))
    first.train()
    saved = checkpoint_files.read_tensors(f"{tmp_path}/model.ckpt-1")
    names = sorted(k for k in saved if k.startswith(balance.SCOPE))
    assert [k for k in names if "/optimizer/" not in k] == learned
    if learned:  # Each learned weight's Adam slots and step count.
        assert f"balance/optimizer/m/{learned[-1][len('balance/'):]}" in names
        assert saved["balance/optimizer/iterations"] == 1
    scalars, images = tensorboard(tmp_path)
    losses = {task: scalars[f"train/{task}/loss"][1] for task in ("rp", "col")}
    weights = {task: scalars[f"balance/{task}/weight"][1] for task in ("rp", "col")}
    assert "balance/gradient_cosine" in images and "balance/cosine/rp_col" in scalars
    if method == "uncertainty":  # Adam's first step moves s by the learning rate against its gradient 1 - L.
        for task in ("rp", "col"):
            assert saved[f"balance/{task}/log_variance"] == pytest.approx(0.025 * np.sign(losses[task] - 1), rel=1e-3)
            assert weights[task] == pytest.approx(np.exp(-saved[f"balance/{task}/log_variance"]), rel=1e-6)
    if method == "gradnorm":  # The first losses are kept; the weights sum to the task count.
        for task in ("rp", "col"):
            assert saved[f"balance/{task}/initial_loss"] == pytest.approx(losses[task], rel=1e-5)
        assert sum(weights.values()) == pytest.approx(2.0, rel=1e-6) and weights["rp"] != weights["col"]
    if method == "pcgrad":  # One conflicting pair or none: its coefficients say which.
        cosine = float(first.state.balance.cosines.numpy()[0, 1])
        assert (weights["rp"] > 1 and weights["col"] > 1) if cosine < 0 else weights == {"rp": 1.0, "col": 1.0}

    resumed = trainer.Trainer(config(tmp_path, method, max_steps=2))
    assert resumed.prepare() == 1
    for name, variable in resumed.state.variables().items():
        if name.startswith(balance.SCOPE):
            np.testing.assert_array_equal(variable.numpy(), saved[name], err_msg=name)
    resumed.train()
    after = checkpoint_files.read_tensors(f"{tmp_path}/model.ckpt-2")
    if learned:
        assert after["balance/optimizer/iterations"] == 2
        assert any(not np.array_equal(after[k], saved[k]) for k in learned if not k.endswith("initial_loss"))


@pytest.mark.slow
def test_measuring_gradient_cosines_leaves_the_update_unchanged(tmp_path):
    """A summary step also computes every task's trunk gradient; the step's update is the
    one of a step that does not."""
    for every in (1, 5):
        trainer.Trainer(config(tmp_path / f"every{every}", "none", max_steps=3, save_every_steps=3,
                               summary_every_steps=every)).train()
    measured = checkpoint_files.read_tensors(f"{tmp_path}/every1/model.ckpt-3")
    plain = checkpoint_files.read_tensors(f"{tmp_path}/every5/model.ckpt-3")
    assert sorted(measured) == sorted(plain)
    for name in measured:
        np.testing.assert_array_equal(measured[name], plain[name], err_msg=name)
    assert "balance/gradient_cosine" in tensorboard(tmp_path / "every1")[1]


@pytest.mark.slow
def test_gradnorm_without_trunk_weights_to_train_is_one_clear_error(tmp_path):
    with pytest.raises(MtssError, match="--balance gradnorm needs trunk conv weights that train"):
        # Only the BatchNorm of block3's last unit trains in the trunk: GradNorm has no layer to measure.
        scope = "resnet_v2_101/block3/unit_4/bottleneck_v2/conv2/BatchNorm"
        trainer.Trainer(config(tmp_path, "gradnorm", trainable_scopes=[scope, "rp_head", "col_head"])).train()
