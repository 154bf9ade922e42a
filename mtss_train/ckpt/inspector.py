"""Inspects name-based checkpoints.

    python -m mtss_train.ckpt ls CKPT                   # names, dtypes, shapes; reads every tensor
    python -m mtss_train.ckpt diff CKPT OTHER           # what differs between two checkpoints
    python -m mtss_train.ckpt diff CKPT --against trunk # CKPT vs the variables our trunk makes

CKPT is a checkpoint prefix, one of its files, or a directory (its latest checkpoint).
`diff` ends with the `--exclude_scopes` that would skip every variable whose shape or
dtype differs, i.e. what a warm start or the released README recipe needs.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import collections
from typing import Iterable, Mapping

import numpy as np
from absl import app, flags

from mtss_train.ckpt import checkpoint_files
from mtss_train.model import trunk
from mtss_train.ckpt.checkpoint_files import TensorSpec
from mtss_train.compat import slim, tf
from mtss_train.errors import MtssError, cli_main
from mtss_train.model.slim_layer import slim_name

_AGAINST = flags.DEFINE_enum(
    "against", None, ["trunk"], "Diff against the variables of our trunk instead of a 2nd checkpoint."
)
_TRUNK_SIZE = flags.DEFINE_enum(
    "trunk_size", "101", list(trunk.TRUNK_SIZES), "Trunk to diff against with --against trunk."
)

USAGE = "usage: python -m mtss_train.ckpt ls CKPT | diff CKPT (OTHER | --against trunk)"


def trunk_specs(size: str = "101") -> dict[str, TensorSpec]:
    """Name -> spec of every variable the trunk creates (built in a throwaway graph)."""
    with tf.Graph().as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        with slim.arg_scope(trunk.trunk_arg_scope()):
            trunk.resnet_v2_101_block3(images, False, blocks=trunk.trunk_blocks(size))
        return {slim_name(v): checkpoint_files.spec_of(v) for v in tf.compat.v1.global_variables()}


def list_checkpoint(path: str) -> str:
    """The `ls` listing: one line per tensor, then totals per top-level scope."""
    specs = checkpoint_files.read_specs(path)
    values = checkpoint_files.read_tensors(path)  # Reading everything detects truncation.
    width = max(len(n) for n in specs)
    lines = [f"{name:<{width}}  {spec.dtype:<8} {list(spec.shape)}" for name, spec in specs.items()]
    per_scope = collections.Counter()
    for name, value in values.items():
        per_scope[name.split("/")[0]] += np.size(value)
    lines.append(f"{len(specs)} tensors in {checkpoint_files.resolve(path)}")
    lines += [f"  {scope}: {count:,} values" for scope, count in sorted(per_scope.items())]
    return "\n".join(lines)


def covering_scopes(names: Iterable[str], keep: Iterable[str]) -> list[str]:
    """Shortest name prefixes (whole path components) covering `names` but none of `keep`."""
    keep = list(keep)
    scopes = set()
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            scope = "/".join(parts[:depth])
            if not any(k == scope or k.startswith(scope + "/") for k in keep):
                scopes.add(scope)
                break
    return sorted(s for s in scopes if not any(s.startswith(o + "/") for o in scopes))


def diff_specs(
    left: Mapping[str, TensorSpec], right: Mapping[str, TensorSpec], left_name: str, right_name: str
) -> str:
    """The `diff` report between two name -> spec maps."""
    common = sorted(set(left) & set(right))
    differ = [n for n in common if left[n] != right[n]]
    same = [n for n in common if left[n] == right[n]]
    only_left = sorted(set(left) - set(right))
    only_right = sorted(set(right) - set(left))
    lines = [f"A = {left_name}", f"B = {right_name}", f"{len(same)} identical names/shapes/dtypes"]
    for side, names in (("A", only_left), ("B", only_right)):
        lines.append(f"{len(names)} only in {side}" + (":" if names else ""))
        lines += [f"  {s}/..." for s in covering_scopes(names, same + differ)]
    lines.append(f"{len(differ)} with different shape or dtype" + (":" if differ else ""))
    lines += [f"  {n}: A {left[n]} vs B {right[n]}" for n in differ]
    if differ:
        lines.append("suggested: --exclude_scopes=" + ",".join(covering_scopes(differ, same)))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """`ls CKPT`, `diff CKPT OTHER` or `diff CKPT --against trunk`; prints the result.

    Raises:
      MtssError: any other command line (the message is the usage).
    """
    command, *paths = argv[1:] or [""]
    if command == "ls" and len(paths) == 1:
        print(list_checkpoint(paths[0]))
    elif command == "diff" and len(paths) == 2 and _AGAINST.value is None:
        a, b = (checkpoint_files.resolve(p) for p in paths)
        print(diff_specs(checkpoint_files.read_specs(a), checkpoint_files.read_specs(b), a, b))
    elif command == "diff" and len(paths) == 1 and _AGAINST.value == "trunk":
        a = checkpoint_files.resolve(paths[0])
        specs = trunk_specs(_TRUNK_SIZE.value)
        print(diff_specs(checkpoint_files.read_specs(a), specs, a, f"trunk ({_TRUNK_SIZE.value})"))
    else:
        raise MtssError(USAGE)


def run() -> None:
    """Entry point of `python -m mtss_train.ckpt` and `mtss-ckpt`: errors as one line, exit 2."""
    app.run(cli_main(main))

