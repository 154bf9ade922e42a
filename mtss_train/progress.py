"""The progress line of every command that runs for minutes (training has its own, per step).

    with ProgressLine("features of train", total=60_000, unit="images") as progress:
        for batch in batches:
            progress.advance(len(batch))
        progress.finish()

prints, on stderr, lines such as

    features of train: 12,800/60,000 images, 410.2 images/s, ETA 0:01:55

rewritten in place on a terminal (at most twice a second) and a new line every few seconds
elsewhere (a log file, a test's captured output), then a last line that says how long it took
(`with` ends a line left open by an error).
"""

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """'H:MM:SS', hours past 24 included ('27:00:00')."""
    whole = round(max(seconds, 0))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class ProgressLine:
    """Count of `total` `unit`s done, the rate, the ETA, and an optional detail.

    Args:
      label: what is being done, first on the line.
      total: how many units there are; None if unknown (no ETA then).
      unit: what is counted, plural ('images', 'videos').
      stream: where to write; stderr by default.
      enabled: False makes every call do nothing (e.g. a --quiet flag).
      every: seconds between new lines when `stream` is not a terminal.
    """

    def __init__(self, label: str, total: int | None, unit: str, stream: TextIO | None = None,
                 enabled: bool = True, every: float = 2.0):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.every = 0.5 if self.terminal else every
        self.count = 0
        self.start = self.shown = time.monotonic()
        self._width = 0  # Of the last line rewritten in place, to blank what a shorter one leaves.

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, error_type: type | None, *_: object) -> None:
        """After an error, ends a line left open on a terminal, so the error's line starts anew."""
        if error_type is not None and self.terminal and self._width:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def seconds(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start

    def line(self, detail: str = "") -> str:
        rate = self.count / max(self.seconds, 1e-9)
        total = f"/{self.total:,}" if self.total is not None else ""
        eta = f", ETA {duration((self.total - self.count) / rate)}" if self.total and rate > 0 else ""
        return f"{self.label}: {self.count:,}{total} {self.unit}, {rate:.1f} {self.unit}/s{eta}" + (
            f", {detail}" if detail else "")

    def advance(self, count: int = 1, detail: str = "") -> None:
        """Counts `count` more units done; shows the line if it is time to."""
        self.count += count
        if self.enabled and time.monotonic() - self.shown >= self.every:
            self.shown = time.monotonic()
            self._show(self.line(detail), final=False)

    def finish(self, detail: str = "") -> float:
        """Shows the last line, with the time taken; returns the seconds since the start."""
        seconds = self.seconds
        if self.enabled:
            self._show(f"{self.line(detail)}, done in {duration(seconds)}", final=True)
        return seconds

    def _show(self, text: str, final: bool) -> None:
        if self.terminal:
            self.stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
