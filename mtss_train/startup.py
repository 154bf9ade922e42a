"""Process-wide settings of this project's command-line programs; library code never imports it.

A program imports it first, before anything imports TensorFlow, which reads
TF_CPP_MIN_LOG_LEVEL once, when it loads:

    from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.
"""

import os
import warnings

# TensorFlow's C++ start-up INFO/WARNING lines (CPU features, oneDNN) are not actionable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# FFmpeg prints its own lines (e.g. "EBML header parsing failed") for every bad video; our
# DataError already says which file and why. OpenCV reads this when it first opens a video.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
# slim layers run through the legacy Keras layer machinery, which warns on every call about
# `apply`/`updates` it uses itself.
warnings.filterwarnings("ignore", r"`layer\.(apply|updates)`", UserWarning)
