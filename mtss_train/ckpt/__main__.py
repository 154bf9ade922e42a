"""`python -m mtss_train.ckpt`: see mtss_train.ckpt.inspector."""

from mtss_train.ckpt.inspector import run

run()
