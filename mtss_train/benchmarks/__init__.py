"""The pieces of `python -m mtss_train.benchmark`: timing, the anchors, pipelines, scaling."""
