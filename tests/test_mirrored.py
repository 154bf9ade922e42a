"""MirroredStrategy on two logical CPU devices, in subprocesses, which can split their CPU
before TensorFlow starts: two replicas of half a batch take the step of one replica."""

import json
import subprocess
import sys

import pytest

from conftest import cli_env

# One process each, no cluster: these run beside other tests (test_distributed's clusters do not).
pytestmark = pytest.mark.slow


# Splits the CPU into two logical devices; --strategy mirrored then means one replica on each
# (as MirroredStrategy over two GPUs), while the default strategy keeps one replica.
TWO_CPUS = """
import glob, json, os, shutil, sys
import numpy as np
from mtss_train.ckpt import checkpoint_files
from mtss_train.train import trainer
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig
from mtss_train.errors import MtssError

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
one_replica = tf.distribute.get_strategy()
trainer.make_strategy = lambda name, cluster=None: (
    tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if name == "mirrored" else one_replica)
params = {"patch_size": "32", "gap": "8", "jitter": "2", "head_width": "32"}

def tiny_rp(train_dir, **settings):
    return TrainConfig(train_dir=train_dir, tasks=["rp"], trunk_size="tiny", summary_every_steps=1,
                       task_params={"rp": {**params, "batch_size": "4"}}, **settings)

def losses(train_dir):  # Each step's rp loss, as TensorBoard holds it (a summary every step).
    found = {}
    for path in glob.glob(os.path.join(train_dir, "logs", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            found.update({event.step: float(tf.make_ndarray(v.tensor))
                          for v in event.summary.value if v.tag == "train/rp/loss"})
    return [found[step] for step in sorted(found)]

def relative_differences(a, b):  # Max over the tensors of two checkpoints of max |a - b| / max |a|.
    a, b = checkpoint_files.read_tensors(a), checkpoint_files.read_tensors(b)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    differences = {"model": 0.0, "optimizer": 0.0, "balance": 0.0}
    for name in a:
        kind = next((k for k in ("optimizer", "balance") if name.startswith(k + "/")), "model")
        difference = float(np.max(np.abs(a[name] - b[name])) / max(np.max(np.abs(a[name])), 1e-12))
        differences[kind] = max(differences[kind], difference)
    return differences
"""


def run_two_cpus(script: str, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-c", TWO_CPUS + script, *args], capture_output=True, text=True,
                         timeout=900, env=cli_env())
    assert run.returncode == 0, run.stderr[-3000:]
    return run


BATCH_THAT_DOES_NOT_SPLIT = """
try:
    trainer.Trainer(TrainConfig(train_dir=sys.argv[1], tasks=["rp"], trunk_size="tiny", strategy="mirrored",
                                task_params={"rp": {**params, "batch_size": "3"}}))
except MtssError as e:
    print("error:", e)
run = trainer.Trainer(tiny_rp(sys.argv[1], max_steps=2, strategy="mirrored"))
print("replicas", run.strategy.num_replicas_in_sync, "saved", run.train())
"""


def test_a_batch_that_does_not_split_over_the_replicas_is_one_clear_error(tmp_path):
    run = run_two_cpus(BATCH_THAT_DOES_NOT_SPLIT, str(tmp_path))
    assert "error: rp.batch_size 3 does not split over 2 replicas; use a multiple of 2" in run.stdout
    assert f"replicas 2 saved {tmp_path}/model.ckpt-2" in run.stdout


MIRRORED_AGAINST_ONE_REPLICA = """
root = sys.argv[1]
report = {}
for strategy in ("default", "mirrored"):  # BatchNorm training, from the seeded initial weights.
    trainer.Trainer(tiny_rp(f"{root}/{strategy}-bn", max_steps=4, strategy=strategy, batch_norm_decay=0.5)).train()
    report[f"{strategy}-bn"] = losses(f"{root}/{strategy}-bn")
# What the replicas compute on step 1: replica 0 gets the pipeline's first 2 examples, replica 1
# the next 2, and BatchNorm normalises each half with that half's own statistics.
check = trainer.Trainer(tiny_rp(f"{root}/check"))
batch = check.first_batches(check.iterators(check.sources, check.config.seed))["rp"]
check.prepare({"rp": batch})
report["halves"] = []
for half in (tf.nest.map_structure(lambda x: x[i:i + 2], batch) for i in (0, 2)):
    per_example, _ = check.model.tasks["rp"].loss(check.model("rp", half, training=True), half)
    report["halves"].append(float(tf.reduce_mean(per_example)))
# Frozen BatchNorm, fine-tuning the BN-trained weights. At a learning rate of 1e-3 this tiny run
# reaches a step (the 3rd) where any 1e-7 change of the weights, on one device too, moves the
# update by 3e-5; 1e-4 keeps the trajectory smooth, so what remains is the strategies' own difference.
for strategy in ("default", "mirrored"):
    trainer.Trainer(tiny_rp(f"{root}/{strategy}-frozen", max_steps=4, strategy=strategy, freeze_batch_norm=True,
                            learning_rate=1e-4, init_checkpoint=f"{root}/default-bn")).train()
    report[f"{strategy}-frozen"] = losses(f"{root}/{strategy}-frozen")
for kind in ("bn", "frozen"):
    report[f"weights-{kind}"] = relative_differences(f"{root}/default-{kind}/model.ckpt-4",
                                                     f"{root}/mirrored-{kind}/model.ckpt-4")
warm = checkpoint_files.read_tensors(f"{root}/default-bn/model.ckpt-4")
statistics = [k for k in warm if "/moving_" in k]
report["statistics-kept"] = all(
    np.array_equal(checkpoint_files.read_tensors(f"{root}/{strategy}-frozen/model.ckpt-4", statistics)[k], warm[k])
    for strategy in ("default", "mirrored") for k in statistics)
print(json.dumps(report))
"""


def test_mirrored_on_two_replicas_trains_as_one_replica_on_the_same_global_batch(tmp_path):
    """A task's batch_size is global: two replicas of half a batch each take the single-device steps.

    With frozen BatchNorm only the float32 summation order differs (measured over 4 steps:
    losses within 4e-7 relative, weights within 1.1e-6 and optimizer slots within 4.5e-6 of
    each tensor's largest value). With BatchNorm training each replica normalises with its
    own half-batch statistics (tf-slim has no synchronised BN): the first step's loss is the
    mean of the two half-batch losses, 4% off the full-batch one here, and later steps 5-7%.
    """
    report = json.loads(run_two_cpus(MIRRORED_AGAINST_ONE_REPLICA, str(tmp_path)).stdout.splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["statistics-kept"]  # Frozen BatchNorm never updates its moving statistics.
    assert report["mirrored-frozen"] == pytest.approx(report["default-frozen"], rel=1e-5)
    assert report["weights-frozen"]["model"] < 1e-5 and report["weights-frozen"]["optimizer"] < 5e-5
    first_default, first_mirrored = report["default-bn"][0], report["mirrored-bn"][0]
    assert first_mirrored == pytest.approx(sum(report["halves"]) / 2, rel=1e-5)
    assert abs(first_mirrored - first_default) > 1e-3 * first_default


RESUME_UNDER_ANOTHER_REPLICA_COUNT = """
root = sys.argv[1]
trainer.Trainer(tiny_rp(f"{root}/one", max_steps=2, batch_norm_decay=0.5)).train()
# A resume reseeds the inputs by its start step: a copy resumed on one replica is the reference.
shutil.copytree(f"{root}/one", f"{root}/two")
report = {}

def resume(name, strategy, max_steps):  # Fine-tuning, slowly enough for a smooth trajectory.
    run = trainer.Trainer(tiny_rp(f"{root}/{name}", max_steps=max_steps, strategy=strategy, freeze_batch_norm=True,
                                  learning_rate=1e-4))
    start = run.prepare()
    saved = checkpoint_files.read_tensors(checkpoint_files.latest(f"{root}/{name}"))
    restored = {k: [np.array_equal(x, saved[k]) for x in run.strategy.experimental_local_results(v)]
                for k, v in run.state.variables().items()}
    per_replica = [int(b["label"].shape[0])
                   for b in run.strategy.experimental_local_results(next(run.iterators(run.sources, 0)["rp"]))]
    last = run.train()
    report[f"{name}-{strategy}"] = {
        "start": start, "restored": all(all(v) for v in restored.values()), "per_replica": per_replica,
        "iterations": int(run.state.optimizer.iterations.numpy()), "last": os.path.basename(last),
        "global_step": int(checkpoint_files.read_tensors(last, ["global_step"])["global_step"]),
        "losses": losses(f"{root}/{name}"),
    }

resume("one", "default", 4)
resume("two", "mirrored", 4)
report["weights"] = relative_differences(f"{root}/one/model.ckpt-4", f"{root}/two/model.ckpt-4")
resume("two", "default", 6)
print(json.dumps(report))
"""


def test_a_run_resumes_under_another_replica_count(tmp_path):
    """2 steps on one replica; then 2 on two replicas (frozen BN), which match those of a copy
    resumed on one replica (measured: weights within 1e-6, optimizer slots within 3e-6);
    then 2 more on one replica. Each resume restores every variable on every replica and
    continues the global step (the optimizer's iteration count)."""
    report = json.loads(run_two_cpus(RESUME_UNDER_ANOTHER_REPLICA_COUNT, str(tmp_path)).stdout.splitlines()[-1])
    print(json.dumps(report, indent=1))
    one, two, back = report["one-default"], report["two-mirrored"], report["two-default"]
    for run, start, end, per_replica in ((one, 2, 4, [4]), (two, 2, 4, [2, 2]), (back, 4, 6, [4])):
        assert run["start"] == start and run["restored"]
        assert run["iterations"] == run["global_step"] == end and run["last"] == f"model.ckpt-{end}"
        assert run["per_replica"] == per_replica  # rp.batch_size=4 is the global batch.
    assert two["losses"][:2] == one["losses"][:2]  # Steps 1-2, before the copy.
    assert two["losses"][2:4] == pytest.approx(one["losses"][2:4], rel=1e-5)
    assert report["weights"]["model"] < 1e-5 and report["weights"]["optimizer"] < 5e-5
    assert len(back["losses"]) == 6


RP_AND_COL_ON_TWO_REPLICAS = """
root, settings = sys.argv[1], json.loads(sys.argv[2])
for strategy in ("default", "mirrored"):  # Frozen BatchNorm: the replicas' halves normalise alike.
    trainer.Trainer(TrainConfig(
        train_dir=f"{root}/{strategy}", tasks=["rp", "col"], trunk_size="tiny", strategy=strategy, max_steps=3,
        summary_every_steps=1, freeze_batch_norm=True, learning_rate=1e-4, **settings,
        task_params={"rp": {**params, "batch_size": "4"},
                     "col": {"batch_size": "4", "crop": "64", "resize_side": "96"}})).train()
print(json.dumps(relative_differences(f"{root}/default/model.ckpt-3", f"{root}/mirrored/model.ckpt-3")))
"""


@pytest.mark.parametrize("settings", [
    {"schedule": "all", "balance": "uncertainty"}, {"schedule": "all", "balance": "gradnorm"},
    {"schedule": "all", "balance": "pcgrad"}, {"optimizer_state": "per_task", "clip_norm": 0.01},
], ids=["uncertainty", "gradnorm", "pcgrad", "per_task"])
def test_balanced_and_per_task_steps_on_two_replicas_are_the_step_of_one_replica_on_the_same_global_batch(
        tmp_path, settings):
    """Balances and per-task optimizers decide from gradients summed over the replicas (and
    clip them together), so two replicas of half the batch reach the single-device weights,
    slots and learned balance (frozen BatchNorm: only the float32 summation order differs).
    One setting per process: each MirroredStrategy of a process restarts its collective
    keys, which the runtime caches with their shapes."""
    found = json.loads(run_two_cpus(RP_AND_COL_ON_TWO_REPLICAS, str(tmp_path), json.dumps(settings))
                       .stdout.splitlines()[-1])
    print(settings, found)
    assert found["model"] < 1e-5 and found["optimizer"] < 5e-5 and found["balance"] < 1e-5
