"""The progress line the long-running commands share."""

import io

from mtss_train.progress import ProgressLine, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_with_count_rate_eta_and_detail():
    log = io.StringIO()
    progress = ProgressLine("prior", 4, "images", stream=log, every=0)
    progress.advance(3, detail="50 bins seen")
    progress.finish()
    first, last = log.getvalue().splitlines()
    assert first.startswith("prior: 3/4 images, ") and " images/s, ETA 0:00:00, 50 bins seen" in first
    assert last.startswith("prior: 3/4 images") and last.endswith(", done in 0:00:00")


def test_a_terminal_gets_one_line_rewritten_in_place():
    terminal = Terminal()
    progress = ProgressLine("motion masks", None, "videos", stream=terminal)
    progress.every = 0
    progress.advance(detail="a longer detail than the last line has")
    progress.finish()
    text = terminal.getvalue()
    assert text.count("\r") == 2 and text.count("\n") == 1 and text.endswith("\n")
    assert "ETA" not in text  # No total, no ETA.
    rewritten = text.split("\r")[2]
    assert len(rewritten.rstrip("\n")) >= len(text.split("\r")[1])  # Covers what the longer line left.


def test_a_disabled_line_writes_nothing_but_still_counts():
    log = io.StringIO()
    progress = ProgressLine("features", 10, "images", stream=log, enabled=False, every=0)
    progress.advance(10)
    assert progress.finish() >= 0 and progress.count == 10 and log.getvalue() == ""


def test_an_error_ends_the_line_left_open_on_a_terminal():
    terminal = Terminal()
    try:
        with ProgressLine("features", 10, "images", stream=terminal) as progress:
            progress.every = 0
            progress.advance(4)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert terminal.getvalue().startswith("\rfeatures: 4/10 images") and terminal.getvalue().endswith("\n")
    assert "done in" not in terminal.getvalue()


def test_durations_read_as_a_clock():
    assert duration(0.4) == "0:00:00" and duration(3725) == "1:02:05" and duration(-3) == "0:00:00"
    assert duration(27 * 3600) == "27:00:00"
