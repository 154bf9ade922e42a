"""The small-scale reproduction, end to end in its tiny mode, and its JSON."""

import json
import os
import re
import subprocess

import pytest
from absl import flags
from absl.testing import flagsaver

from mtss_train.ckpt import checkpoint_files
from mtss_train.errors import MtssError, cli_main
from mtss_train.eval import reproduce
from mtss_train.provenance import code_version
from conftest import assert_one_line_error, run_cli, run_here
from test_settings import parse

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def fashion_mnist() -> str:
    if not os.path.isdir(FASHION_MNIST):
        if not os.environ.get("CI"):
            pytest.skip(f"{FASHION_MNIST} missing: apt-get install dataset-fashion-mnist")
        pytest.fail(f"CI is set but {FASHION_MNIST} is missing: .ci/run must apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


def reproduce_here(capfd, *argv: str) -> subprocess.CompletedProcess:
    """`python -m mtss_train.eval.reproduce --tiny ARGV` run in this process and ended as the
    program ends (an untrained arm still trains in a `python -m mtss_train` of its own)."""
    with flagsaver.flagsaver():
        return run_here(capfd, lambda: cli_main(reproduce.main)(flags.FLAGS(["reproduce", "--tiny", *argv])), argv)


# Two single tasks and all four tasks (col and ms on their own data) with harmonization and
# the lasso: every kind of arm, in 3 of the 7 arms' time.
TINY_ARMS = ("rp", "ex", "rp+col+ex+ms-harm-lasso")


@pytest.mark.slow
def test_tiny_reproduction_trains_every_arm_from_one_init_and_writes_the_table(tmp_path, fashion_mnist, capfd):
    out = tmp_path / "repro"
    result = run_cli("mtss_train.eval.reproduce", "--tiny", f"--out={out}", f"--fashion_mnist={fashion_mnist}",
                     f"--arms={','.join(TINY_ARMS)}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((out / "results.json").read_text())

    assert set(found["arms"]) == {reproduce.RANDOM_ARM, *TINY_ARMS}
    probe_images = 200 // 64 * 64  # The recalibrated column: every full batch of the 200 probe training images.
    for arm, summary in found["arms"].items():
        for column in reproduce.COLUMNS:
            assert list(summary[column]["seeds"]) == ["0"], arm
            run = summary[column]["seeds"]["0"]
            assert 0.0 <= run["test_top1"] <= 1.0 and run["test_examples"] == 200 and run["train_examples"] == 200
            assert summary[column]["test_top1_mean"] == run["test_top1"] and summary[column]["test_top1_std"] == 0.0
            assert run["feature_shape"] == [3, 3, 128] and run["trunk_size"] == "tiny"
        assert summary["plain"]["seeds"]["0"]["recalibrate_bn"] is None
        recalibrated = summary["recalibrated_bn"]["seeds"]["0"]["recalibrate_bn"]
        assert recalibrated["images"] == probe_images and recalibrated["data"].endswith("fashion-mnist/train")
        assert arm in result.stdout
    init = checkpoint_files.latest(str(out / "init" / "seed0"))
    assert found["arms"][reproduce.RANDOM_ARM]["plain"]["seeds"]["0"]["checkpoint"] == init
    plan = reproduce.Plan(str(out), (0,), TINY_ARMS, 4, 0.01, fashion_mnist, 300, 200, 100)
    for arm in TINY_ARMS:
        train_dir = plan.train_dir(arm, 0)
        assert checkpoint_files.latest(train_dir).endswith("-4"), arm
        flags_json = json.loads(open(os.path.join(train_dir, "flags.json")).read())
        assert flags_json["init_checkpoint"] == init and flags_json["tasks"] == list(reproduce.ARMS[arm].tasks)
        assert (flags_json["harmonize"], flags_json["lasso"]) == (arm.endswith("-harm-lasso"),) * 2, arm
        assert found["arms"][arm]["train_seconds"]["0"] > 0
    for column, claims in found["claims"].items():
        singles = {arm: found["arms"][arm][column]["test_top1_mean"] for arm in ("rp", "ex")}
        assert claims["best_single_task"] == max(singles, key=singles.get) and claims["best_arm"] in TINY_ARMS
        single = singles[claims["best_single_task"]]
        assert set(claims["combination_minus_best_single"]) == {"rp+col+ex+ms-harm-lasso"}
        for arm, difference in claims["combination_minus_best_single"].items():
            assert difference == pytest.approx(found["arms"][arm][column]["test_top1_mean"] - single)
        assert f"{column}: claim 1: best arm {claims['best_arm']}" in result.stdout
        assert f"{column}: claim 2: rp+col+ex+ms-harm-lasso" in result.stdout
    assert "budget: 4 task batches per arm" in result.stdout and found["budget"] in result.stdout
    assert "recalibrated BN top-1" in result.stdout.splitlines()[1]

    # The same command in another --out gives the same figures, from bit-identical checkpoints.
    assert found["commit"] == code_version() and "commit " + code_version() in result.stdout
    assert all(found["arms"][arm]["trained_by"] == {"0": code_version()} for arm in TINY_ARMS)
    twin = run_cli("mtss_train.eval.reproduce", "--tiny", f"--out={tmp_path / 'twin'}",
                   f"--fashion_mnist={fashion_mnist}", "--arms=rp", timeout=900)
    assert twin.returncode == 0, twin.stderr[-3000:]
    twin_found = json.loads((tmp_path / "twin" / "results.json").read_text())
    for arm in (reproduce.RANDOM_ARM, "rp"):
        for column in reproduce.COLUMNS:
            ours, theirs = (figures(f["arms"][arm][column]["seeds"]["0"]) for f in (found, twin_found))
            assert ours == theirs and "checkpoint_digest" in ours, (arm, column)

    # A second run finds the arm trained and its features cached: nothing is trained again.
    # The runs from here on are in this process (the command line and its end are tested
    # above; a process that ran other tests may differ in the last bits of fresh features).
    trained = checkpoint_files.latest(plan.train_dir("rp", 0)) + ".index"
    written = os.path.getmtime(trained)
    again = reproduce_here(capfd, f"--out={out}", f"--fashion_mnist={fashion_mnist}", "--arms=rp")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "results.json").read_text())
    assert os.path.getmtime(trained) == written and set(rerun["arms"]) == {reproduce.RANDOM_ARM, "rp"}
    assert rerun["arms"]["rp"]["train_seconds"] == found["arms"]["rp"]["train_seconds"]
    assert "from the cache" in again.stderr and "BatchNorm statistics of" not in again.stderr

    # Other settings never resume an arm trained with these: the table would mix them.
    other = reproduce_here(capfd, f"--out={out}", f"--fashion_mnist={fashion_mnist}", "--arms=rp", "--learning_rate=0.5")
    assert_one_line_error(other, plan.train_dir("rp", 0), "learning_rate 0.01", "0.5")
    for column in reproduce.COLUMNS:
        assert rerun["arms"]["rp"][column]["test_top1_mean"] == found["arms"]["rp"][column]["test_top1_mean"]

    # Nor does other code, unless asked: one table, one commit.
    flags_path = os.path.join(plan.train_dir("rp", 0), "flags.json")
    recorded = json.loads(open(flags_path).read())
    with open(flags_path, "w") as f:
        json.dump({**recorded, "commit": "0123abc"}, f)
    refused = reproduce_here(capfd, f"--out={out}", f"--fashion_mnist={fashion_mnist}", "--arms=rp")
    assert_one_line_error(refused, plan.train_dir("rp", 0), "0123abc", code_version(), "--reuse_other_commits")
    reused = reproduce_here(capfd, f"--out={out}", f"--fashion_mnist={fashion_mnist}", "--arms=rp",
                            "--reuse_other_commits")
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["arms"]["rp"]["trained_by"] == {"0": "0123abc"}


def figures(result: dict) -> dict:
    """A probe result without what names where it ran (paths) or how long it took."""
    return {key: value for key, value in result.items()
            if key not in ("checkpoint", "trunk", "seconds", "train_data", "test_data", "recalibrate_bn")}


def test_bad_arms_and_missing_data_are_one_line_errors(tmp_path, capfd):
    bad_arm = reproduce_here(capfd, f"--out={tmp_path}", "--arms=rp,jigsaw")
    assert_one_line_error(bad_arm, "--arms", "jigsaw")
    missing = reproduce_here(capfd, f"--out={tmp_path}", f"--fashion_mnist={tmp_path}/none")
    assert_one_line_error(missing, "Fashion-MNIST", f"{tmp_path}/none")


def test_an_arm_with_settings_trains_with_them_and_what_it_cannot_read_is_refused(tmp_path):
    arm = reproduce.arm_of("rp+ex@schedule=all@balance=pcgrad@lasso=true@lasso_l1=0.1")
    assert arm == reproduce.Arm(("rp", "ex"), {"schedule": "all", "balance": "pcgrad", "lasso": True, "lasso_l1": 0.1})
    assert reproduce.arm_of("rp+col+ex+ms-harm-lasso@lasso_l1=0.05").settings == {
        "harmonize": True, "lasso": True, "lasso_l1": 0.05}
    name = "rp+ex@schedule=all@balance=gradnorm@gradnorm_alpha=0.5"
    plan = reproduce.Plan(str(tmp_path), (0,), (name,), 4, 0.01, "fm", 300, 200, 100)
    command = reproduce.train_command(plan, name, 0, "init", {"fashion_mnist": "images", "colour": "photos"})
    config = parse(*command[3:])  # What `python -m mtss_train` makes of it.
    config.validate()
    assert (config.tasks, config.schedule, config.balance, config.gradnorm_alpha) == (["rp", "ex"], "all", "gradnorm", 0.5)
    # The budget is 4 task batches: each step of schedule=all takes one of both tasks.
    assert config.max_steps == 2 and reproduce.arm_steps(plan, "rp+ex") == 4
    os.makedirs(plan.train_dir(name, 0))
    earlier = {"max_steps": 2, "learning_rate": 0.01, "seed": 0, "init_checkpoint": "init", "schedule": "all",
               "balance": "pcgrad", "gradnorm_alpha": 0.5,
               "task_params": {task: {key: str(value) for key, value in reproduce.TASK_PARAMS[task].items()}
                               for task in ("rp", "ex")}}
    flags_path = os.path.join(plan.train_dir(name, 0), "flags.json")
    for recorded, refusal in [(earlier, "balance 'pcgrad', this one asks for 'gradnorm'"),
                              ({**earlier, "max_steps": 4}, "max_steps 4, this one asks for 2"),
                              ({**earlier, "balance": "gradnorm", "deterministic": True}, "deterministic True")]:
        with open(flags_path, "w") as f:  # An earlier run of other settings.
            json.dump(recorded, f)
        with pytest.raises(MtssError, match=re.escape(refusal)):
            reproduce.check_earlier_run(plan, name, 0, "init")
    with open(flags_path, "w") as f:  # Older than --deterministic: trained without it.
        json.dump({**earlier, "balance": "gradnorm"}, f)
    reproduce.check_earlier_run(plan, name, 0, "init")
    # Task settings: over TASK_PARAMS, into the command and into what an earlier run must match.
    views = "ex@ex.loss=infonce@ex.views=4@ex.batch_size=16"
    assert reproduce.arm_of(views).task_params == {"ex": {"loss": "infonce", "views": "4", "batch_size": "16"}}
    command = reproduce.train_command(plan, views, 0, "init", {"fashion_mnist": "images", "colour": "photos"})
    ex = parse(*command[3:]).task_params["ex"]
    assert (ex["loss"], ex["views"], ex["batch_size"], ex["crop_size"]) == ("infonce", "4", "16", "96")
    os.makedirs(plan.train_dir(views, 0))
    with open(os.path.join(plan.train_dir(views, 0), "flags.json"), "w") as f:
        json.dump({**earlier, "schedule": "round_robin", "max_steps": 4, "balance": "none",
                   "task_params": {"ex": reproduce.arm_of("ex").all_task_params()["ex"]}}, f)
    with pytest.raises(MtssError, match=re.escape("ex.batch_size '32', this one asks for '16'")):
        reproduce.check_earlier_run(plan, views, 0, "init")
    for bad, fragment in [("rp@ex.loss=infonce", "'ex' is not among its tasks"), ("ex@ex.loss=cosine", "ex.loss"),
                          ("ex@ex.nothing=1", "nothing")]:
        with pytest.raises(MtssError, match=re.escape(fragment)):
            reproduce.arm_of(bad)
    for bad, fragment in [("rp+jigsaw@schedule=all", "jigsaw"), ("rp+ex@max_steps=9", "sets 'max_steps'"),
                          ("rp+ex@lasso=maybe", "'maybe' where true or false"), ("rp+ex@lasso_l1=x", "a float goes"),
                          ("ex+rp", "is not one of")]:
        with pytest.raises(MtssError, match=re.escape(fragment)):
            reproduce.arm_of(bad)
