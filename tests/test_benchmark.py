"""The benchmark script runs and prints its ratios (its numbers are read by people, not asserted)."""

import re

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_benchmark_prints_rates_and_ratios():
    run = run_cli("mtss_train.benchmark", "--tasks", "rp", "--trunk_size", "tiny", "--steps", "1", "--batch_size", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"rp: input [\d.]+ batches/s  trunk [\d.]+ batches/s  step [\d.]+ batches/s  trained [\d.]+", run.stdout)
    assert re.search(r"rp: step/trunk time [\d.]+x  input/trained rate [\d.]+x", run.stdout)
    assert re.search(r"peak resident memory \d+ MiB", run.stdout)
