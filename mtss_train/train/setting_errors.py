"""TensorFlow errors that a task's settings caused, told as one line naming the settings.

A `--task_param` can ask for more memory than there is (`rp.patch_size=100000` resizes
each photo to 300k x 300k pixels) or for a head TF cannot build (`rp.head_width=1` makes a
conv with zero filters). TF then raises ResourceExhaustedError or InvalidArgumentError with
a long traceback that names an op, not the setting; `explained` turns them into an
MtssError naming the task, what it was doing and its settings.
"""

import contextlib
import dataclasses
import re
from typing import Iterator, Sequence

from mtss_train.compat import tf
from mtss_train.errors import MtssError
from mtss_train.task import Task


def op_message(error: tf.errors.OpError) -> str:
    """The op's own message: without Keras's wrapping, the function-node prefix, the op name."""
    lines = [line.strip() for line in (error.message or str(error)).splitlines() if line.strip()]
    line = next((line for line in lines if "{{function_node" in line), lines[0] if lines else type(error).__name__)
    line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", line)


def describe_settings(task: Task) -> str:
    """The task's settings that differ from its defaults (all of them if none differs)."""
    values = dataclasses.asdict(task.config)
    try:
        defaults = dataclasses.asdict(type(task.config)())
    except TypeError:  # A Config with required fields has no defaults to compare with.
        defaults = {}
    changed = {k: v for k, v in values.items() if defaults.get(k, v) != v or not defaults}
    shown = changed or values
    text = ", ".join(f"{task.name}.{k}={v}" for k, v in shown.items())
    return text if changed else f"{text} (its defaults)"


# What an error of each kind says about the tasks at work, and what to do about it.
_MEANINGS = {
    tf.errors.ResourceExhaustedError: ("ran out of memory", "lower those that size the input or the batch"),
    tf.errors.InvalidArgumentError: ("failed", "check them against the task's documentation"),
}


@contextlib.contextmanager
def explained(tasks: Sequence[Task], doing: str) -> Iterator[None]:
    """Turns out-of-memory and invalid-argument errors from TF into an MtssError naming
    `tasks` (the ones at work), what they were `doing`, and their settings."""
    try:
        yield
    except tuple(_MEANINGS) as e:
        what, advice = next(meaning for kind, meaning in _MEANINGS.items() if isinstance(e, kind))
        raise MtssError(
            f"{' and '.join(t.name for t in tasks)} {what} {doing} ({op_message(e)}); settings: "
            f"{'; '.join(describe_settings(t) for t in tasks)}; {advice}"
        ) from None
