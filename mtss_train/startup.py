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
sees everything TensorFlow prints. The trainer logs the devices it trains on, in one line.
"""

import os
import re
import sys
import tempfile
import warnings

# TensorFlow's C++ start-up INFO/WARNING lines (CPU features, oneDNN) are not actionable.
_QUIET = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# FFmpeg prints its own lines (e.g. "EBML header parsing failed") for every bad video; our
# DataError already says which file and why. OpenCV reads this when it first opens a video.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
# slim layers run through the legacy Keras layer machinery, which warns on every call about
# `apply`/`updates` it uses itself.
warnings.filterwarnings("ignore", r"`layer\.(apply|updates)`", UserWarning)

NO_CUDA_DRIVER = re.compile(r"\] Could not find cuda drivers on your machine")
NO_GPU_CUINIT = re.compile(r"^E\d{4} .*\] failed call to cuInit: ")
LOAD_NOTICES = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^I\d{4} .*\] oneDNN custom operations are on\."
    r"|" + NO_CUDA_DRIVER.pattern)


def kept_lines(printed: str) -> str:
    """What of TensorFlow's start-up output a user should see: all but LOAD_NOTICES, and
    the cuInit failure only where a CUDA driver was found."""
    no_driver = NO_CUDA_DRIVER.search(printed) is not None
    return "".join(line for line in printed.splitlines(keepends=True)
                   if not LOAD_NOTICES.search(line) and not (no_driver and NO_GPU_CUINIT.search(line)))


def _load_tensorflow_filtered() -> None:
    """Imports TensorFlow and lists the GPUs (where cuInit runs) with file descriptor 2 in a
    temporary file, then writes what `kept_lines` keeps to the real stderr, also when the
    import fails. The C++ code writes to the descriptor, past sys.stderr."""
    sys.stderr.flush()
    real_stderr = os.dup(2)
    with tempfile.TemporaryFile() as printed:
        os.dup2(printed.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")
        finally:
            sys.stderr.flush()
            os.dup2(real_stderr, 2)
            os.close(real_stderr)
            printed.seek(0)
            sys.stderr.write(kept_lines(printed.read().decode(errors="replace")))
            sys.stderr.flush()


if _QUIET:
    _load_tensorflow_filtered()
