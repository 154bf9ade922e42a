"""The shipped configurations: absl flagfiles beside this module, chosen with `--config NAME`."""

import os

from mtss_train.errors import MtssError

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_SUFFIX = ".flags"


def shipped_configs() -> list[str]:
    """Names of the shipped configurations, e.g. 'rp_col_ex_ms'."""
    return sorted(n[: -len(CONFIG_SUFFIX)] for n in os.listdir(CONFIG_DIR) if n.endswith(CONFIG_SUFFIX))


def expand_config(argv: list[str]) -> list[str]:
    """Puts `--flagfile=<shipped file>` for `--config NAME` first, so every flag on the
    command line, wherever it stands, overrides the configuration's.

    Raises:
      MtssError: naming the shipped configurations if NAME is not one.
    """
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    names += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    flagfiles = []
    for name in names:
        if name not in shipped_configs():
            raise MtssError(f"--config {name!r} is not a shipped configuration; known: {', '.join(shipped_configs())}")
        flagfiles.append(f"--flagfile={os.path.join(CONFIG_DIR, name + CONFIG_SUFFIX)}")
    return argv[:1] + flagfiles + argv[1:]
