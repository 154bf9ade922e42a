import numpy as np
import pytest

from mtss_train.ckpt import checkpoint_files, inspector
from mtss_train.errors import MtssError, message
from conftest import assert_one_line_error, run_cli


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_trunk):
    values = dict(tiny_trunk.variables_by_name())
    values["rp_head/fc8/weights"] = np.zeros([4, 8], np.float32)
    return checkpoint_files.save(str(tmp_path / "run"), values, step=5)


def test_ls_lists_names_dtypes_shapes_and_totals(tiny_checkpoint, tiny_trunk):
    listing = inspector.list_checkpoint(tiny_checkpoint)
    assert "resnet_v2_101/conv1/weights" in listing
    line = next(l for l in listing.splitlines() if l.startswith("rp_head/fc8/weights"))
    assert line.split()[1:] == ["float32", "[4,", "8]"]
    assert f"{len(tiny_trunk.variables_by_name()) + 1} tensors in {tiny_checkpoint}" in listing
    assert "  rp_head: 32 values" in listing


def test_diff_against_the_trunk_it_was_made_from(tiny_checkpoint, tiny_trunk):
    report = inspector.diff_specs(
        checkpoint_files.read_specs(tiny_checkpoint), inspector.trunk_specs("tiny"), "A", "trunk"
    )
    assert f"{len(tiny_trunk.variables_by_name())} identical names/shapes/dtypes" in report
    assert "1 only in A:\n  rp_head/..." in report
    assert "0 only in B" in report and "suggested" not in report


def test_diff_suggests_excludes_for_shape_mismatches():
    spec = checkpoint_files.TensorSpec
    left = {"net/a/w": spec((1,), "float32"), "net/b/w": spec((2,), "float32"),
            "net/b/v": spec((3,), "float32"), "head/w": spec((1,), "float32")}
    right = {"net/a/w": spec((1,), "float32"), "net/b/w": spec((5,), "float32"),
             "net/b/v": spec((4,), "float32"), "other/w": spec((1,), "float32")}
    report = inspector.diff_specs(left, right, "A", "B")
    assert "net/b/w: A float32[2] vs B float32[5]" in report
    assert report.splitlines()[-1] == "suggested: --exclude_scopes=net/b"


@pytest.mark.slow
def test_cli_ls_and_diff_run_as_commands_and_an_error_is_one_line(tiny_checkpoint, tmp_path):
    result = run_cli("mtss_train.ckpt", "ls", str(tmp_path / "run"), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "resnet_v2_101/block3/unit_2/bottleneck_v2/conv3/weights" in result.stdout
    result = run_cli("mtss_train.ckpt", "diff", tiny_checkpoint, "--against", "trunk",
                     "--trunk_size", "tiny")
    assert result.returncode == 0, result.stderr
    assert "1 only in A:" in result.stdout
    missing = run_cli("mtss_train.ckpt", "ls", str(tmp_path / "missing.ckpt"))
    assert_one_line_error(missing, "does not exist", str(tmp_path / "missing.ckpt"))
    assert missing.returncode == 2


def make_bad_checkpoint_path(kind, directory):
    if kind == "nonexistent":
        return directory / "missing.ckpt"
    if kind == "empty-dir":
        return directory
    if kind == "not-a-checkpoint":
        (directory / "notes.txt").write_text("not a checkpoint")
        return directory / "notes.txt"
    prefix = checkpoint_files.save(str(directory), {"x": np.zeros([4096], np.float32)}, 5)
    with open(prefix + ".data-00000-of-00001", "r+b") as f:
        f.truncate(100)
    return prefix


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("nonexistent", "does not exist"),
        ("empty-dir", "no checkpoint in directory"),
        ("truncated-data", "corrupt or truncated"),
        ("not-a-checkpoint", "is not a checkpoint"),
    ],
)
def test_bad_input_is_one_error_naming_the_path(tmp_path, kind, fragment):
    """As `python -m mtss_train.ckpt ls PATH` meets it, in this process (the test above runs
    one through the program, which prints it as one line)."""
    path = make_bad_checkpoint_path(kind, tmp_path)
    with pytest.raises(MtssError) as raised:
        inspector.main(["mtss_train.ckpt", "ls", str(path)])
    assert fragment in message(raised.value) and str(path) in message(raised.value)


def test_an_unknown_command_is_a_usage_error():
    with pytest.raises(MtssError, match="usage:"):
        inspector.main(["mtss_train.ckpt", "frobnicate"])
