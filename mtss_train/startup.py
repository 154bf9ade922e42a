"""Process-wide settings of this project's command-line programs; library code never imports it.

A program imports it first, before anything else imports TensorFlow, which reads
TF_CPP_MIN_LOG_LEVEL once, when it loads:

    from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

It loads TensorFlow itself and looks for GPUs once, with the process's stderr caught, and
passes on every line but TensorFlow's known start-up notices (`LOAD_NOTICES`): TensorFlow
2.21 prints those whatever TF_CPP_MIN_LOG_LEVEL says, among them an `E0000 ... failed call
to cuInit` on every machine without a GPU driver: an error line in a healthy CPU run. That
line is dropped only when TensorFlow also said it found no CUDA driver; on a machine with a
driver a failing cuInit is a real error and shows. A user who sets TF_CPP_MIN_LOG_LEVEL
to 0 or 1 sees everything TensorFlow prints. The trainer logs the devices it trains on, in one line.
"""

import contextlib
import os
import re
import sys
import threading
import warnings
from typing import Callable, Iterator

# TensorFlow's C++ start-up INFO/WARNING lines (CPU features, oneDNN) are not actionable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# mtss_train.compat sets this too, but TensorFlow imports the Keras it names when it loads:
# without it, Keras 3 (and matplotlib) for nothing, 0.6 s of every start.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# FFmpeg prints its own lines (e.g. "EBML header parsing failed") for every bad video; our
# DataError already says which file and why. OpenCV reads this when it first opens a video.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
# slim layers run through the legacy Keras layer machinery, which warns on every call about
# `apply`/`updates` it uses itself.
warnings.filterwarnings("ignore", r"`layer\.(apply|updates)`", UserWarning)

# How long `filtered_stderr` waits for child processes that outlive its block to exit.
CHILDREN_EXIT_SECONDS = 10
NO_CUDA_DRIVER = re.compile(r"\] Could not find cuda drivers on your machine")
NO_GPU_CUINIT = re.compile(r"^E\d{4} .*\] failed call to cuInit: ")
LOAD_NOTICES = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^I\d{4} .*\] oneDNN custom operations are on\."
    r"|" + NO_CUDA_DRIVER.pattern)


class TensorFlowLoadNotices:
    """`keep(line)`, line by line in the order printed: False for LOAD_NOTICES, and for the
    cuInit failure once TensorFlow said it found no CUDA driver (it says so first)."""

    def __init__(self):
        self.no_driver = False

    def keep(self, line: str) -> bool:
        self.no_driver = self.no_driver or NO_CUDA_DRIVER.search(line) is not None
        return not LOAD_NOTICES.search(line) and not (self.no_driver and NO_GPU_CUINIT.search(line))


@contextlib.contextmanager
def filtered_stderr(keep: Callable[[str], bool]) -> Iterator[None]:
    """Within the block, file descriptor 2 of this process, and of the processes it starts,
    is a pipe; a thread passes each line `keep` accepts on to the real stderr. C++ code and
    child processes write to the descriptor, past sys.stderr. Children that outlive the
    block go on writing through the thread until they exit."""
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward(destination: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if keep(line.decode(errors="replace")):
                    os.write(destination, line)
        os.close(destination)

    thread = threading.Thread(target=forward, args=(os.dup(real_stderr),), name="filtered_stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # Closes this process's write end: the thread sees the end once children exit.
        os.close(real_stderr)
        thread.join(timeout=CHILDREN_EXIT_SECONDS)


def _load_tensorflow() -> None:
    """Imports TensorFlow and lists the GPUs (where cuInit runs), without its load notices.

    Python's own writes go straight to the console: a program that ends at once on Ctrl-C
    while TensorFlow loads (os._exit, mtss_train.__main__) would leave its message in the
    pipe. The console stream stays open: logging handlers made while loading keep it.
    """
    console = os.fdopen(os.dup(2), "w", buffering=1)
    with filtered_stderr(TensorFlowLoadNotices().keep), contextlib.redirect_stderr(console):
        import tensorflow as tf
        tf.config.list_physical_devices("GPU")


if os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("0", "1"):  # Asked for INFO or WARNING lines: all of them.
    _load_tensorflow()
