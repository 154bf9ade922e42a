"""Atomic writes: data.files.write_atomically (local files) and beam_io.write_then_rename (gfile)."""

import os
import pathlib
import threading

import pytest

from mtss_train.data import files


def test_a_write_lands_whole_with_a_plain_files_permissions_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "result.json"
    seen = []

    def write(temporary: str) -> None:
        seen.append(temporary)
        assert os.path.exists(temporary) and not target.exists()  # Nothing under the name until whole.
        pathlib.Path(temporary).write_text("new")

    files.write_atomically(str(target), write)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["result.json"]
    assert os.path.dirname(seen[0]) == str(tmp_path) and seen[0].endswith(".tmp")  # Beside it: rename, not copy.
    (tmp_path / "plain").write_text("")
    assert os.stat(target).st_mode == os.stat(tmp_path / "plain").st_mode  # mkstemp would give 0600.


def test_a_failed_write_keeps_the_old_file_and_removes_its_own(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def half_write(temporary: str) -> None:
        pathlib.Path(temporary).write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.write_atomically(str(target), half_write)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def test_writers_of_one_path_at_once_leave_one_whole_copy(tmp_path):
    # Threads share a pid: a temporary name made from the pid alone would be shared too.
    target = tmp_path / "shared.bin"
    contents = [bytes([i]) * 200_000 for i in range(8)]
    start = threading.Barrier(len(contents))
    errors = []

    def writer(content: bytes) -> None:
        def write(temporary: str) -> None:
            start.wait()
            with open(temporary, "wb") as f:
                for offset in range(0, len(content), 4096):
                    f.write(content[offset:offset + 4096])

        try:
            files.write_atomically(str(target), write)
        except Exception as e:  # noqa: BLE001  Reported below, with the thread's own error.
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(content,)) for content in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and target.read_bytes() in contents and os.listdir(tmp_path) == ["shared.bin"]


def test_the_data_is_synced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = str(tmp_path / "result.json")
    files.write_atomically(target, lambda temporary: pathlib.Path(temporary).write_text("x"))
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[1][1] == target and events[2][1] == str(tmp_path)


def test_gfile_writes_rename_a_file_of_their_own(tmp_path):
    pytest.importorskip("apache_beam")
    from mtss_train.data import beam_io

    target = str(tmp_path / "manifest.json")
    names = []

    def write(temporary: str) -> int:
        names.append(temporary)
        pathlib.Path(temporary).write_text("{}")
        return 7

    assert beam_io.write_then_rename(target, write) == 7 and beam_io.write_then_rename(target, write) == 7
    assert names[0] != names[1]  # Each attempt its own file (Beam may run one twice at once).
    assert os.listdir(tmp_path) == ["manifest.json"]

    def broken(temporary: str) -> None:
        pathlib.Path(temporary).write_text("{")
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        beam_io.write_then_rename(target, broken)
    assert os.listdir(tmp_path) == ["manifest.json"] and pathlib.Path(target).read_text() == "{}"
