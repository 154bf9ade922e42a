import errno
import os
import random
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files
from mtss_train.ckpt.checkpoint_files import TensorSpec
from mtss_train.compat import tf
from mtss_train.errors import CheckpointError


def test_saved_keys_are_slim_names_not_object_paths(tmp_path, tiny_trunk):
    values = {n: v for n, v in tiny_trunk.variables_by_name().items()}
    values["global_step"] = tf.constant(12, tf.int64)
    prefix = checkpoint_files.save(str(tmp_path), values, step=12)
    assert prefix == str(tmp_path / "model.ckpt-12")
    listed = dict(tf.train.list_variables(str(tmp_path)))
    assert set(listed) == set(values)
    assert not any("ATTRIBUTES" in n or n.startswith("_") for n in listed)
    restored = checkpoint_files.read_tensors(prefix)
    for name, variable in tiny_trunk.variables_by_name().items():
        np.testing.assert_array_equal(restored[name], variable.numpy())
    assert restored["global_step"] == 12


def test_v1_saver_in_a_graph_reads_our_checkpoint(tmp_path):
    checkpoint_files.save(str(tmp_path), {"scope/w": np.arange(6, dtype=np.float32).reshape(2, 3)}, 1)
    with tf.Graph().as_default():
        with tf.compat.v1.variable_scope("scope"):
            w = tf.compat.v1.get_variable("w", [2, 3])
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver().restore(sess, tf.train.latest_checkpoint(str(tmp_path)))
            np.testing.assert_array_equal(sess.run(w), np.arange(6).reshape(2, 3))


def test_keeps_the_last_n_and_points_the_state_file_at_the_newest(tmp_path):
    for step in (1, 5, 9, 13):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(step)}, step, keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint",
        "model.ckpt-13.data-00000-of-00001",
        "model.ckpt-13.index",
        "model.ckpt-9.data-00000-of-00001",
        "model.ckpt-9.index",
    ]
    assert checkpoint_files.latest(str(tmp_path)) == str(tmp_path / "model.ckpt-13")
    assert tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths == [
        str(tmp_path / "model.ckpt-9"),
        str(tmp_path / "model.ckpt-13"),
    ]


def test_latest_is_the_highest_complete_step_whatever_the_state_file_says(tmp_path):
    for step in (3, 20, 21):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(step)}, step)
    os.remove(tmp_path / "model.ckpt-21.index")  # As if killed between the two renames.
    os.remove(tmp_path / "checkpoint")
    assert checkpoint_files.latest(str(tmp_path)) == str(tmp_path / "model.ckpt-20")
    checkpoint_files.save(str(tmp_path), {"x": np.float32(22)}, 22)
    # As if killed after the index rename, before the state file update.
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-20"\n')
    assert checkpoint_files.latest(str(tmp_path)) == str(tmp_path / "model.ckpt-22")


def test_latest_finds_an_unnumbered_checkpoint_through_the_state_file(tmp_path):
    with tf.Graph().as_default():
        tf.compat.v1.get_variable("w", [1])
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, str(tmp_path / "slim.ckpt"))
    assert checkpoint_files.latest(str(tmp_path)) == str(tmp_path / "slim.ckpt")


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_debris(tmp_path, monkeypatch):
    checkpoint_files.save(str(tmp_path), {"x": np.float32(1)}, 1)
    before = sorted(os.listdir(tmp_path))
    real_save = tf.raw_ops.SaveV2

    def disk_full(prefix, **kwargs):
        real_save(prefix=prefix, **kwargs)  # Leaves partial files, like a full disk would.
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.raw_ops, "SaveV2", disk_full)
    with pytest.raises(CheckpointError, match="model.ckpt-2.*No space left"):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(2)}, 2)
    assert sorted(os.listdir(tmp_path)) == before
    assert checkpoint_files.read_tensors(str(tmp_path))["x"] == 1


_SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mtss_train.ckpt import checkpoint_files
    latest = checkpoint_files.latest(sys.argv[1])
    step = int(latest.rsplit("-", 1)[1]) if latest else 0
    while True:
        step += 1
        values = {f"v{i}": np.full([256, 256], step, np.float32) for i in range(8)}
        checkpoint_files.save(sys.argv[1], values, step, keep=2)
        print(step, flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_complete_latest_checkpoint(tmp_path):
    rng = random.Random(0)
    last_step = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        proc.stdout.readline()  # Wait until the writer is in its save loop.
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        prefix = checkpoint_files.latest(str(tmp_path))
        values = checkpoint_files.read_tensors(prefix)
        step = int(prefix.rsplit("-", 1)[1])
        assert step > last_step
        assert sorted(values) == [f"v{i}" for i in range(8)]
        assert all((v == step).all() for v in values.values())
        last_step = step
    checkpoint_files.save(str(tmp_path), {"x": np.float32(0)}, last_step + 1, keep=2)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n or ".tempstate" in n]


def test_a_save_sweeps_debris_of_killed_saves_but_not_other_files(tmp_path):
    checkpoint_files.save(str(tmp_path), {"x": np.float32(1)}, 1)
    debris = ["model.ckpt-2.tmp99.index", "model.ckpt-2.tmp99.data-00000-of-00001",
              "model.ckpt-1.tmp98.index.tempstate123", "checkpoint.tmp97", "checkpoint.0f3a9c1e.tmp",
              "model.ckpt-0.data-00000-of-00001"]
    for name in debris + ["notes.txt", "model.ckpt-best.index", "checkpoint.bak"]:
        (tmp_path / name).write_text("x")
    checkpoint_files.save(str(tmp_path), {"x": np.float32(3)}, 3)
    assert sorted(os.listdir(tmp_path)) == sorted([
        "checkpoint", "notes.txt", "model.ckpt-best.index", "checkpoint.bak",
        "model.ckpt-1.index", "model.ckpt-1.data-00000-of-00001",
        "model.ckpt-3.index", "model.ckpt-3.data-00000-of-00001",
    ])


def test_a_step_is_saved_once(tmp_path):
    checkpoint_files.save(str(tmp_path), {"x": np.float32(1)}, 7)
    with pytest.raises(ValueError, match="model.ckpt-7 already exists"):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(2)}, 7)


def test_resolve_accepts_prefix_index_data_and_directory(tmp_path):
    prefix = checkpoint_files.save(str(tmp_path), {"x": np.float32(1)}, 4)
    for path in (prefix, prefix + ".index", prefix + ".data-00000-of-00001", str(tmp_path)):
        assert checkpoint_files.resolve(path) == prefix


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "nope"), "does not exist"),
        (lambda d: str(d), "no checkpoint in directory"),
        (lambda d: (d / "notes.txt").write_text("hi") and str(d / "notes.txt"), "is not a checkpoint"),
    ],
)
def test_resolve_errors_name_the_path(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint_files.resolve(path)
    assert str(path) in str(info.value)


def test_a_truncated_data_file_is_reported_as_such(tmp_path):
    prefix = checkpoint_files.save(str(tmp_path), {"x": np.zeros([1000], np.float32)}, 1)
    os.truncate(prefix + ".data-00000-of-00001", 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint_files.read_tensors(prefix)


def test_a_garbage_index_is_reported(tmp_path):
    (tmp_path / "model.ckpt-1.index").write_bytes(b"not a table")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint_files.read_specs(str(tmp_path / "model.ckpt-1"))


def _model_and_checkpoint(tmp_path):
    checkpoint_files.save(
        str(tmp_path),
        {
            "net/a": np.full([2], 7, np.float32),
            "net/c": np.zeros([3], np.float32),
            "net/d": np.zeros([1], np.float32),
            "head/e": np.zeros([1], np.int64),
        },
        1,
    )
    return {
        "net/a": tf.Variable(np.zeros([2], np.float32), name="net/a"),
        "net/b": tf.Variable(np.zeros([2], np.float32), name="net/b"),
        "net/c": tf.Variable(np.zeros([4], np.float32), name="net/c"),
        "head/e": tf.Variable(np.zeros([1], np.float32), name="head/e"),
    }


def test_restore_report_sorts_every_variable_into_its_bucket(tmp_path):
    variables = _model_and_checkpoint(tmp_path)
    report = checkpoint_files.restore_variables(variables, str(tmp_path))
    assert report.matched == ["net/a"]
    assert report.missing_in_checkpoint == ["net/b"]
    assert report.unused_in_checkpoint == ["net/d"]
    assert report.mismatched == [
        ("head/e", TensorSpec((1,), "float32"), TensorSpec((1,), "int64")),
        ("net/c", TensorSpec((4,), "float32"), TensorSpec((3,), "float32")),
    ]
    np.testing.assert_array_equal(variables["net/a"].numpy(), [7, 7])
    np.testing.assert_array_equal(variables["net/c"].numpy(), np.zeros(4))
    text = report.format()
    assert "1 matched, 1 missing in checkpoint, 1 unused in checkpoint, 2 shape/dtype mismatch" in text
    assert "net/c: float32[4] vs float32[3]" in text


def test_required_scopes_and_excludes(tmp_path):
    variables = _model_and_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="lacks 2 required.*net/b, net/c"):
        checkpoint_files.restore_variables(variables, str(tmp_path), required_scopes=["net/"])
    np.testing.assert_array_equal(variables["net/a"].numpy(), [0, 0])  # Nothing assigned.
    report = checkpoint_files.restore_variables(
        variables, str(tmp_path), exclude_scopes=["net/b", "net/c"], required_scopes=["net/"]
    )
    assert report.excluded == ["net/b", "net/c"] and report.matched == ["net/a"]


def test_nothing_matched_is_an_error(tmp_path):
    checkpoint_files.save(str(tmp_path), {"other/x": np.float32(1)}, 1)
    with pytest.raises(CheckpointError, match="no variable of the model matched"):
        checkpoint_files.restore_variables({"net/a": tf.Variable(1.0)}, str(tmp_path))


def test_newest_readable_skips_damaged_checkpoints_saying_why(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint_files.save(str(tmp_path), {"x": np.full([1000], step, np.float32)}, step)
    os.truncate(tmp_path / "model.ckpt-4.data-00000-of-00001", 100)
    os.remove(tmp_path / "model.ckpt-3.data-00000-of-00001")
    (tmp_path / "model.ckpt-9.index").write_bytes(b"")  # A stray empty index.
    prefix, skipped = checkpoint_files.newest_readable(str(tmp_path))
    assert prefix == str(tmp_path / "model.ckpt-2")
    assert [(os.path.basename(p), why.split(": ", 1)[0]) for p, why in skipped] == [
        ("model.ckpt-9", f"cannot read checkpoint {tmp_path}/model.ckpt-9"),
        ("model.ckpt-4", f"checkpoint {tmp_path}/model.ckpt-4 is truncated"),
        ("model.ckpt-3", f"checkpoint {tmp_path}/model.ckpt-3 has no data file (model.ckpt-3.data-*)"),
    ]
    assert checkpoint_files.newest_readable(str(tmp_path), exclude=[prefix])[0] == str(tmp_path / "model.ckpt-1")


def test_a_set_aside_checkpoint_is_out_of_every_listing_and_sweep(tmp_path):
    for step in (1, 2):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(step)}, step)
    assert checkpoint_files.set_aside(str(tmp_path / "model.ckpt-2")) == str(tmp_path / "unreadable")
    assert sorted(os.listdir(tmp_path / "unreadable")) == ["model.ckpt-2.data-00000-of-00001", "model.ckpt-2.index"]
    assert checkpoint_files.candidates(str(tmp_path)) == [str(tmp_path / "model.ckpt-1")]
    checkpoint_files.save(str(tmp_path), {"x": np.float32(2)}, 2, keep=1)  # The step can be saved again.
    assert checkpoint_files.read_tensors(str(tmp_path))["x"] == 2
    assert len(os.listdir(tmp_path / "unreadable")) == 2


def test_a_full_disk_at_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint_files.save(str(tmp_path), {"x": np.float32(1)}, 1)
    before = sorted(os.listdir(tmp_path))

    def fsync(path: str) -> None:  # Delayed allocation: a full disk shows at fsync.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_files, "_fsync", fsync)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*model.ckpt-2: .*No space left on device"):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(2)}, 2)
    assert sorted(os.listdir(tmp_path)) == before
    assert checkpoint_files.read_tensors(str(tmp_path))["x"] == 1


def test_a_failed_state_file_update_is_an_error_but_the_new_checkpoint_counts(tmp_path, monkeypatch):
    checkpoint_files.save(str(tmp_path), {"x": np.float32(1)}, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_files, "_update_state", full)
    with pytest.raises(CheckpointError, match="wrote checkpoint .*model.ckpt-2 but could not update"):
        checkpoint_files.save(str(tmp_path), {"x": np.float32(2)}, 2)
    assert checkpoint_files.read_tensors(str(tmp_path))["x"] == 2
