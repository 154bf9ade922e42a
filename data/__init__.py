"""Input readers and the embedded sample data (installed as `mtss_train.data`)."""
