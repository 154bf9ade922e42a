import mtss_train.tasks.foo as f; print("ok", f.__file__)
