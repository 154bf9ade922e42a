"""`python -m mtss_train.benchmark` (its __main__) and its parts: timing, anchors, pipelines, scaling, beam."""
