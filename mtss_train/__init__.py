"""mtss-train: multi-task self-supervised pre-training of a slim ResNet-v2-101 trunk.

Reproduces the training behind "Multi-Task Self-Supervised Visual Learning" (Doersch &
Zisserman, ICCV 2017): relative position, colorization, exemplar and motion segmentation
heads over one shared ResNet-v2-101 cut at block3, with checkpoints that tf-slim restores
by variable name.
"""

import os as _os

__version__ = "0.1.0"

# `tasks/` and `data/` sit beside this package in the repository and install as
# mtss_train.tasks / mtss_train.data. When the package is imported from a checkout (e.g.
# `python -m mtss_train` in the repo root with a non-editable install, where the checkout
# shadows site-packages), let the import system find them next to this directory.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "tasks")) and _os.path.isfile(
    _os.path.join(_checkout, "tasks", "__init__.py")
):
    __path__.append(_checkout)
