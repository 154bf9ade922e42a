"""Which code made a result: the commit of a checkout, the version of an installed copy."""

import subprocess

import pytest

from mtss_train import provenance


@pytest.fixture
def fresh_cache():
    provenance.code_version.cache_clear()
    yield
    provenance.code_version.cache_clear()


def git(directory, *arguments: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *arguments], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_checkout_gives_its_commit_and_says_when_tracked_files_changed(tmp_path, monkeypatch, fresh_cache):
    package = tmp_path / "repo" / "mtss_train"
    package.mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(provenance, "_REPOSITORY", str(tmp_path / "repo"))
    assert provenance.code_version() == git(tmp_path / "repo", "rev-parse", "HEAD")
    provenance.code_version.cache_clear()
    (package / "a.py").write_text("x = 2\n")
    edited = provenance.code_version()
    assert edited.startswith(git(tmp_path / "repo", "rev-parse", "HEAD") + "-dirty.")
    provenance.code_version.cache_clear()
    (package / "a.py").write_text("x = 3\n")
    assert provenance.code_version() != edited  # Another edit of the same commit.


def test_a_copy_inside_someone_elses_repository_gives_the_installed_version(tmp_path, monkeypatch, fresh_cache):
    git(tmp_path, "init", "-q")  # E.g. a venv's site-packages inside a project's checkout.
    (tmp_path / "site-packages").mkdir()
    monkeypatch.setattr(provenance, "_REPOSITORY", str(tmp_path / "site-packages"))
    assert provenance.code_version().startswith("mtss-train ")
