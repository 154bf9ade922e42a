"""Checkpoints: files read and written by name (checkpoint_files) and the inspector
(`python -m mtss_train.ckpt`)."""
