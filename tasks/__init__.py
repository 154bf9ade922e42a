"""Built-in self-supervised tasks (installed as `mtss_train.tasks`); importing registers them."""

from mtss_train.tasks import col, ex, ms, rp  # noqa: F401
