"""The same command, seed and machine give the same checkpoint, bit for bit (--deterministic)."""

import json

import numpy as np
import pytest

from conftest import run_cli
from mtss_train.ckpt import checkpoint_files
from mtss_train.errors import MtssError
from mtss_train.provenance import code_version
from mtss_train.train.trainer import Trainer
from test_settings import parse

STEPS = 3


def train(train_dir) -> dict[str, np.ndarray]:
    result = run_cli("mtss_train", "--tasks=rp,col,ex,ms", "--smoke", f"--max_steps={STEPS}",
                     "--save_every_steps=1", "--deterministic", f"--train_dir={train_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = checkpoint_files.latest(str(train_dir))
    assert prefix.endswith(f"-{STEPS}")
    return checkpoint_files.read_tensors(prefix)


@pytest.mark.slow
def test_the_same_command_twice_gives_bit_identical_checkpoints(tmp_path):
    first, second = train(tmp_path / "a"), train(tmp_path / "b")
    assert sorted(first) == sorted(second) and len(first) > 300  # Trunk, four heads, optimizer slots.
    different = [name for name in first if first[name].tobytes() != second[name].tobytes()]
    assert different == []
    # The comparison sees a change: the last step moved the weights (identical untrained runs would pass too).
    before = checkpoint_files.read_tensors(str(tmp_path / "a" / f"model.ckpt-{STEPS - 1}"))
    assert [name for name in first if "weights" in name and first[name].tobytes() != before[name].tobytes()]
    recorded = json.loads((tmp_path / "a" / "flags.json").read_text())
    assert recorded["deterministic"] is True and recorded["commit"] == code_version()


@pytest.mark.slow
def test_another_seed_starts_from_other_weights_and_the_same_seed_from_the_same(tmp_path):
    weights = []
    for seed in (0, 1, 0):
        trainer = Trainer(parse("--tasks=rp", "--smoke", f"--seed={seed}", f"--train_dir={tmp_path / str(len(weights))}"))
        trainer.prepare()
        weights.append({name: v.numpy() for name, v in trainer.state.variables().items()
                        if name.endswith("/weights") and not name.startswith("optimizer/")})
    first, other, again = weights
    assert len(first) > 10 and all(np.array_equal(first[name], again[name]) for name in first)
    assert [name for name in first if np.array_equal(first[name], other[name])] == []


def test_deterministic_parameter_server_training_is_refused(tmp_path):
    with pytest.raises(MtssError, match="--deterministic cannot hold under --strategy parameter_server.*asynchron"):
        parse("--deterministic", "--strategy=parameter_server", f"--train_dir={tmp_path}").validate()
