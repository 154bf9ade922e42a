"""The benchmark: its helpers, its slim anchor, and a tiny end-to-end run's printout and JSON.

Timings are read by people, not asserted: the checks are on structure and on arithmetic
the report must be consistent with.
"""

import json
import re
import statistics

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from mtss_train.benchmark import anchors, pipelines, scaling
from mtss_train.benchmark.timing import Sample, interleaved_rounds, ratios, spread
from mtss_train.compat import tf
from mtss_train.train.config import TrainConfig
from mtss_train.errors import MtssError

SPREAD_KEYS = {"median", "min", "max"}


def test_interleaved_rounds_alternate_the_order_and_time_every_call():
    order = []
    contenders = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = interleaved_rounds(contenders, rounds=3, calls=2, warmup=1)
    assert order[:3] == list("abc")  # Warm-up, once each.
    timed = order[3:]
    assert timed == list("aabbcc") + list("ccbbaa") + list("aabbcc")
    assert all(len(samples[n]) == 3 and all(s.calls == 2 for s in samples[n]) for n in "abc")
    assert len(samples["_load"]) == 3


def test_spread_and_per_round_ratios():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    with pytest.raises(ValueError):
        spread([])
    step = [Sample(2.0, 3.0, 1), Sample(4.0, 6.0, 1)]
    slim = [Sample(1.0, 2.0, 1), Sample(2.0, 2.0, 1)]
    assert ratios(step, slim) == [2.0, 2.0]
    assert ratios(step, slim, cpu=True) == [1.5, 3.0]


def test_feeding_compares_examples_per_cpu_second():
    samples = {"input": Sample(0.1, 0.2, 5), "trunk": Sample(1.0, 1.6, 5)}
    fed = pipelines.feeding(samples, examples=8)
    assert fed["input_per_core"] == pytest.approx(40.0)  # 8 examples / 0.2 CPU-s.
    assert fed["trunk_per_s"] == pytest.approx(8.0)
    assert fed["trunk_per_core"] == pytest.approx(5.0)
    assert fed["input_over_trunk_per_core"] == pytest.approx(8.0)
    assert fed["cores_to_feed"] == pytest.approx(0.2)


def test_scaling_grid_varies_one_thing_per_series_and_fits_lines():
    grid = scaling.settings_grid([4, 8], [96, 128, 192])
    assert grid == [(4, 96), (8, 96), (4, 128), (4, 192)]
    rows = [{"batch_size": b, "patch_size": p, "trunk_mpx": 2 * b * p * p / 1e6}
            for b, p in grid]
    split = scaling.series(rows, [4, 8], [96, 128, 192])
    assert [(r["batch_size"], r["patch_size"]) for r in split["batch"]] == [(4, 96), (8, 96)]
    assert [r["patch_size"] for r in split["patch"]] == [96, 128, 192]
    line = [{**r, "t": 0.5 + 2.0 * r["trunk_mpx"]} for r in split["patch"]]
    fit = scaling.linear_fit(line, "t")
    assert fit["fixed"] == pytest.approx(0.5) and fit["per_mpx"] == pytest.approx(2.0)
    assert fit["worst_residual"] < 1e-9
    bent = [{**r, "t": r["trunk_mpx"] ** 2} for r in split["patch"]]
    assert scaling.linear_fit(bent, "t")["worst_residual"] > 0.05
    assert scaling.linear_fit(split["batch"][:1], "t") is None


def test_slim_anchor_is_a_real_training_step_with_batch_norm_updates():
    images = np.random.RandomState(0).uniform(0, 255, [2, 64, 64, 3]).astype(np.float32)
    step = anchors.SlimStep(images, "tiny", TrainConfig(train_dir="/unused", tasks=["rp"]))
    with step.graph.as_default():
        variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
    watched = ["resnet_v2_101/conv1/weights", "resnet_v2_101/block1/unit_1/bottleneck_v2/conv1/BatchNorm/moving_mean"]
    before = step.session.run([variables[n] for n in watched])
    step.step()
    after = step.session.run([variables[n] for n in watched])
    step.close()
    for name, old, new in zip(watched, before, after):
        assert not np.allclose(old, new), f"{name} did not change"
    # The cost analysis counts the backward pass too: about three times the forward convs.
    assert 2.5 < step.step_flops() / step.forward_conv_flops() < 4.0
    # conv1: 7x7x3 -> 64 at stride 2 over 64x64 (32x32 out), 2 images.
    assert step.forward_conv_flops() > 2 * 2 * 32 * 32 * 7 * 7 * 3 * 64


def test_matmul_contender_stays_finite_and_counts_its_flops():
    call, flops = anchors.matmul_contender(64, repeats=5)
    result = call().numpy()
    assert flops == 2 * 64**3 * 5
    assert np.all(np.isfinite(result)) and 0.1 < np.std(result) < 10


@pytest.mark.slow
def test_tiny_run_prints_every_part_and_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    # rp and ms: a task of the shared photos and one with its own source (col and ex take
    # rp's path); all four would add ~12 s.
    run = run_cli("mtss_train.benchmark", "--tasks", "rp,ms", "--trunk_size", "tiny", "--steps", "1",
                  "--rounds", "2", "--batch_size", "2", "--matmul_size", "128", "--extractor_frames", "3",
                  "--scaling_batches", "2", "--scaling_patches", "32", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    for task in ("rp", "ms"):
        assert re.search(rf"{task}: input [\d.]+ batches/s  trunk [\d.]+ batches/s  step [\d.]+ batches/s  "
                         r"trained [\d.]+", run.stdout)
        assert re.search(rf"{task}: step/trunk time [\d.]+x  input/trained rate [\d.]+x", run.stdout)
        assert re.search(rf"{task}: input [\d.]+ examples/s/core; trunk fwd\+bwd consumes", run.stdout)
    assert re.search(r"trainer/bare-slim step time: median [\d.]+x \(min [\d.]+, max [\d.]+\) over 2 rounds",
                     run.stdout)
    assert re.search(r"320x240: [\d.]+ frames/s/core", run.stdout)
    assert re.search(r"peak resident memory \d+ MiB", run.stdout)

    report = json.loads(out.read_text())
    assert set(report) == {"settings", "machine", "anchor", "flops", "pipelines", "extractor", "scaling", "memory"}
    anchor = report["anchor"]
    assert anchor["batch_shape"] == [4, 96, 96, 3]  # 2 pairs of rp patches.
    assert len(anchor["rounds"]) == 2
    per_round = [r["step"]["wall_s"] / r["slim"]["wall_s"] for r in anchor["rounds"]]
    assert anchor["step_over_slim"]["median"] == pytest.approx(statistics.median(per_round))
    for key in ("step_over_slim", "step_over_slim_cpu", "step_over_trunk", "step_over_trunk_cpu"):
        assert set(anchor[key]) == SPREAD_KEYS and anchor[key]["min"] <= anchor[key]["median"] <= anchor[key]["max"]

    flops = report["flops"]
    assert flops["step_flops"] > flops["forward_conv_flops"] > 0
    matmul = 2 * 128**3 * flops["matmul_repeats"]
    rates = [matmul / r["matmul"]["wall_s"] for r in anchor["rounds"]]
    assert flops["matmul_flops_per_s"]["median"] == pytest.approx(statistics.median(rates))

    for task, figures in report["pipelines"].items():
        assert figures["examples_per_batch"] == 2
        assert set(figures["seconds"]) == {"input", "trunk", "step", "trained"}
        assert figures["input_per_core"] == pytest.approx(2 / figures["seconds"]["input"]["cpu_s"])
        assert figures["cores_to_feed"] == pytest.approx(figures["trunk_per_s"] / figures["input_per_core"])
    assert set(report["pipelines"]) == {"rp", "ms"}

    assert set(report["extractor"]) == {"320x240", "640x480"}
    assert all(r["frames"] == 3 and r["frames_per_core"] > 0 for r in report["extractor"].values())

    rows = report["scaling"]["rows"]
    assert [(r["batch_size"], r["patch_size"]) for r in rows] == [(2, 32)]
    for r in rows:
        assert r["trunk_mpx"] == pytest.approx(2 * r["batch_size"] * 32 * 32 / 1e6)
        assert r["peak_rss_mib"] >= r["built_rss_mib"] > r["base_rss_mib"] > 0
    none = {"cpu_s": None, "peak_rss_mib": None}  # One setting: no line to fit (see the fit test).
    assert report["scaling"]["fits"] == {"batch": none, "patch": none}
    assert report["memory"]["peak_rss_mib"] > 0


@pytest.mark.slow
def test_unknown_part_and_missing_out_directory_are_one_line_errors(tmp_path):
    assert_one_line_error(run_cli("mtss_train.benchmark", "--parts", "anchor,speed"), "--parts", "speed")
    missing = tmp_path / "no" / "bench.json"
    assert_one_line_error(run_cli("mtss_train.benchmark", "--out", str(missing)), "--out", str(missing.parent))


def test_scaling_sizes_must_be_positive_integers():
    assert scaling.parse_sizes(["4", "16"], "--scaling_batches") == [4, 16]
    for bad in (["4", "x"], ["0"], []):
        with pytest.raises(MtssError, match="--scaling_batches"):
            scaling.parse_sizes(bad, "--scaling_batches")
