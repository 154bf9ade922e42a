"""`--optimizer_state per_task`: each task's steps move the trunk with slots of their own."""

import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files
from mtss_train.compat import tf
from mtss_train.errors import CheckpointError, MtssError
from mtss_train.train import trainer
from mtss_train.train.config import TrainConfig
from mtss_train.train.optim import PerTaskOptimizers

TINY_RP = {"patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32", "batch_size": "4"}
TINY_COL = {"batch_size": "4", "crop": "64", "resize_side": "96"}
TRUNK_SLOT = "velocity/resnet_v2_101/block3/unit_4/bottleneck_v2/conv3/weights"
RP_HEAD_SLOT = "optimizer/velocity/rp_head/fc6/weights"
# tf_keras RMSprop calls its mean-square slot "velocity".


def config(train_dir, state: str, **settings) -> TrainConfig:
    """rp then col, round robin, on the bundled photos; a checkpoint after every step."""
    return TrainConfig(**{"train_dir": str(train_dir), "tasks": ["rp", "col"], "trunk_size": "tiny",
                          "optimizer_state": state, "max_steps": 2, "save_every_steps": 1, "summary_every_steps": 100,
                          "batch_norm_decay": 0.9, "task_params": {"rp": TINY_RP, "col": TINY_COL}, **settings})


@pytest.mark.slow
def test_each_task_steps_the_trunk_with_its_own_slots_which_other_tasks_never_touch(tmp_path):
    trainer.Trainer(config(tmp_path / "shared", "shared")).train()
    trainer.Trainer(config(tmp_path / "per_task", "per_task")).train()
    shared = [checkpoint_files.read_tensors(f"{tmp_path}/shared/model.ckpt-{step}") for step in (1, 2)]
    own = [checkpoint_files.read_tensors(f"{tmp_path}/per_task/model.ckpt-{step}") for step in (1, 2)]
    rp, col = (f"optimizer/per_task/{task}/{TRUNK_SLOT}" for task in ("rp", "col"))
    assert f"optimizer/{TRUNK_SLOT}" in shared[0] and f"optimizer/{TRUNK_SLOT}" not in own[0]
    assert RP_HEAD_SLOT in own[0]  # Heads keep the model optimizer's slots.
    # Step 1 (rp): the same update as one shared set of slots, into rp's slots only.
    np.testing.assert_allclose(own[0][rp], shared[0][f"optimizer/{TRUNK_SLOT}"], rtol=1e-6)
    weights = "resnet_v2_101/block3/unit_4/bottleneck_v2/conv3/weights"
    np.testing.assert_allclose(own[0][weights], shared[0][weights], rtol=1e-6)
    assert np.any(own[0][rp] > 0) and not np.any(own[0][col])
    # Step 2 (col): col's slots start from zero and rp's stay as rp left them; shared slots mix both.
    np.testing.assert_array_equal(own[1][rp], own[0][rp])
    assert np.any(own[1][col] > 0)
    assert not np.allclose(own[1][col], shared[1][f"optimizer/{TRUNK_SLOT}"], rtol=1e-3)
    assert [own[1][f"optimizer/per_task/{task}/iterations"] for task in ("rp", "col")] == [1, 1]
    assert own[1]["global_step"] == 2

    # A resume restores every task's slots; another --optimizer_state is refused, not restarted.
    resumed = trainer.Trainer(config(tmp_path / "per_task", "per_task", max_steps=3))
    resumed.prepare()
    np.testing.assert_array_equal(resumed.state.variables()[rp].numpy(), own[1][rp])
    with pytest.raises(CheckpointError, match=r"optimizer slots have other names.*--optimizer_state=shared \(was per_task\)"):
        trainer.Trainer(config(tmp_path / "per_task", "shared", max_steps=3)).prepare()


def test_every_task_follows_the_learning_rate_of_the_global_step(tmp_path):
    settings = config(tmp_path, "per_task", lr_schedule="step", max_steps=8, learning_rate=0.1)
    global_step = tf.Variable(0, dtype=tf.int64)
    optimizers = PerTaskOptimizers(settings, ["rp", "col"], global_step)
    variable = tf.Variable(1.0)
    optimizers.build([variable])
    for step, rate in ((0, 0.1), (5, 0.01), (7, 0.001)):  # x0.1 after 1/2 and 3/4 of training.
        global_step.assign(step)
        for optimizer in optimizers.by_task.values():  # A step reads its learning rate.
            optimizer.apply_gradients([(tf.constant(0.0), variable)])
            assert float(optimizer.learning_rate) == pytest.approx(rate)
    assert [int(o.iterations) for o in optimizers.by_task.values()] == [3, 3]


@pytest.mark.parametrize("settings, message", [
    ({"schedule": "all"}, "needs --schedule round_robin or weighted"),
    ({"precision": "float16"}, "use bfloat16"),
    ({"strategy": "parameter_server"}, "parameter_server is not supported"),
])
def test_per_task_state_that_cannot_hold_is_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(MtssError, match=message):
        config(tmp_path, "per_task", **settings).validate()
