"""Shared fixtures: a tiny trunk (same code path as the real one) and a CLI runner."""

import os
import subprocess
import sys
from typing import Callable, Sequence

from mtss_train import startup  # noqa: F401  First: each test process (xdist's too) loads TensorFlow quietly.

import numpy as np
import pytest

from mtss_train import loader


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def run_cli(*args: str, cwd: str | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m ARGS...` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env or cli_env(),
    )


def run_here(capfd, program: Callable[[], None], argv: Sequence[str]) -> subprocess.CompletedProcess:
    """`program()` (a command's main with `argv` parsed, wrapped in `errors.cli_main`) run in
    this process and ended as the program ends: its exit code and what it printed."""
    capfd.readouterr()
    try:
        program()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(argv), code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A failed CLI run ends with one `error: ...` line naming `fragments`, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="session")
def tiny_trunk():
    return loader.trunk_layer("tiny")


@pytest.fixture
def images() -> np.ndarray:
    """Two deterministic RGB images in [0, 255]."""
    return np.random.RandomState(0).uniform(0, 255, [2, 64, 64, 3]).astype(np.float32)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (in their order): under xdist the run ends with the last test started,
    and a minute-long one started last leaves the other cores idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
