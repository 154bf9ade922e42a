"""The documentation: the site builds with warnings as errors, a break of any kind fails
it, the README keeps the commands CI runs, and the tutorial's example task trains."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "rotation")
# What `.ci/run` and a newcomer run, word for word (README "On a fresh machine").
TRAIN_LINE = ("python3 -m venv .venv && .venv/bin/pip install -q -e . && "
              ".venv/bin/python -m mtss_train --tasks rp,col,ex,ms --smoke")
TEST_LINE = ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
             ".venv/bin/python -m pytest -q")
FAST_LINE = '.venv/bin/python -m pytest -q -m "not slow"'


def need_mkdocs() -> None:
    """Skips without the docs tools, except in CI (`CI` set), where that is a failure."""
    if os.environ.get("CI"):
        import mkdocs, mkdocstrings  # noqa: F401,E401  (CI installs the test extra: fail loudly)
    else:
        pytest.importorskip("mkdocs")
        pytest.importorskip("mkdocstrings")


def build(config: str, site: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", config, "-d", site],
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(config),
                          env=cli_env(NO_MKDOCS_2_WARNING="1"))


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    need_mkdocs()
    run = build(os.path.join(REPO, "mkdocs.yml"), str(tmp_path / "site"))
    assert run.returncode == 0, run.stderr[-3000:]
    reference = (tmp_path / "site" / "api" / "task" / "index.html").read_text()
    assert "make_dataset" in reference and "register_task" in reference  # Rendered from docstrings.
    tutorial = (tmp_path / "site" / "adding-a-task" / "index.html").read_text()
    assert "stateless_random_crop" in tutorial and "--8&lt;--" not in tutorial  # Included from examples/.


def copy_of_the_docs(tmp_path) -> str:
    """docs/ and mkdocs.yml in tmp_path, reading the code and examples from the repository."""
    shutil.copytree(os.path.join(REPO, "docs"), tmp_path / "docs")
    config = open(os.path.join(REPO, "mkdocs.yml")).read()
    config = config.replace("paths: [.]", f"paths: [{REPO}]")
    config = config.replace("base_path: [examples]", f"base_path: [{os.path.join(REPO, 'examples')}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    return str(tmp_path / "mkdocs.yml")


@pytest.mark.parametrize("page, old, new, fragment", [
    # A link to a page that does not exist.
    ("index.md", "(training.md)", "(trainig.md)", "trainig.md"),
    # An anchor that is gone (a renamed heading).
    ("index.md", "(getting-started.md#reading-these-pages-locally)",
     "(getting-started.md#reading-the-pages)", "reading-the-pages"),
    # A function the prose refers to was renamed.
    ("checkpoint.md", "[mtss_train.loader.load_feature_extractor]", "[mtss_train.loader.load_features]",
     "load_features"),
    # A module the API reference documents is gone.
    ("api/loader.md", "::: mtss_train.loader", "::: mtss_train.loaders", "mtss_train.loaders"),
    # The tutorial includes a section of the example that no longer exists.
    ("adding-a-task.md", "rotation/rotnet.py:head", "rotation/rotnet.py:heads", "heads"),
])
def test_a_broken_link_page_function_or_snippet_fails_the_build(tmp_path, page, old, new, fragment):
    need_mkdocs()
    config = copy_of_the_docs(tmp_path)
    path = tmp_path / "docs" / page
    text = path.read_text()
    assert old in text, f"{page} no longer has {old!r}: update this test"
    path.write_text(text.replace(old, new))
    run = build(config, str(tmp_path / "site"))
    assert run.returncode != 0, f"the build passed with {new!r} in {page}"
    assert fragment in run.stderr, run.stderr[-3000:]


def test_a_page_left_out_of_the_navigation_fails_the_build(tmp_path):
    need_mkdocs()
    config = copy_of_the_docs(tmp_path)
    (tmp_path / "docs" / "orphan.md").write_text("# Nobody links here\n")
    run = build(config, str(tmp_path / "site"))
    assert run.returncode != 0 and "orphan.md" in run.stderr, run.stderr[-3000:]


def test_the_readme_keeps_the_commands_ci_runs_and_links_to_pages_that_exist():
    readme = open(os.path.join(REPO, "README.md")).read()
    for line in (TRAIN_LINE, TEST_LINE, FAST_LINE):
        assert f"\n    {line}\n" in readme, line
    assert readme.index(TRAIN_LINE) < readme.index(TEST_LINE) < readme.index(FAST_LINE)
    pages = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert pages, "the README links into docs/"
    for page in pages:
        assert os.path.exists(os.path.join(REPO, page)), page


def test_the_launch_readme_points_at_the_distributed_page():
    assert "docs/distributed.md" in open(os.path.join(REPO, "launch", "README.md")).read()
    assert os.path.exists(os.path.join(REPO, "docs", "distributed.md"))


@pytest.mark.slow
def test_the_tutorials_example_task_passes_its_tests():
    """examples/rotation: its pipeline, loss and entry point, and 2 steps beside rp (~30 s)."""
    # -n 0: one process for its 6 tests, not the project's xdist workers (each a TensorFlow start).
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", EXAMPLE],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=cli_env())
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"\b6 passed\b", run.stdout), run.stdout[-2000:]
