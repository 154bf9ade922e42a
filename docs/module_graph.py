"""The import graph of mtss_train, drawn by layer, and the imports that point up.

    python docs/module_graph.py > modules.dot && dot -Tsvg modules.dot > modules.svg
    python docs/module_graph.py --check      # lists imports that point up; exit 1 if any

Each module belongs to a layer (LAYERS, lowest first). A module may import modules of its
own layer and of lower ones; an import of a higher layer is an arrow pointing up, the kind
of dependency that makes a change below ripple through everything above it.
tests/test_module_layers.py runs the check.
"""

import ast
import collections
import fnmatch
import os
import sys
import textwrap
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each installed package's modules live in the repository (see pyproject.toml).
PACKAGE_DIRS = {"mtss_train": "mtss_train", "mtss_train.tasks": "tasks", "mtss_train.data": "data"}

# Lowest first. Patterns are fnmatch patterns over dotted module names; the first match wins.
LAYERS: list[tuple[str, list[str]]] = [
    # startup sets up a program's process (log levels); only programs import it, first.
    ("foundation", ["mtss_train", "mtss_train.compat", "mtss_train.errors", "mtss_train.registry",
                    "mtss_train.progress", "mtss_train.provenance", "mtss_train.startup", "mtss_train.log_levels"]),
    ("data", ["mtss_train.data", "mtss_train.data.files", "mtss_train.data.image_headers", "mtss_train.data.source",
              "mtss_train.data.in_graph", "mtss_train.data.images", "mtss_train.data.masks",
              "mtss_train.data.labelled", "mtss_train.data.sample", "mtss_train.data.video",
              "mtss_train.data.motion_saliency", "mtss_train.data.motion_masks", "mtss_train.data.clip"]),
    ("task API", ["mtss_train.task", "mtss_train.seeds"]),
    ("model", ["mtss_train.model", "mtss_train.model.*"]),
    ("checkpoints", ["mtss_train.ckpt", "mtss_train.ckpt.checkpoint_files", "mtss_train.loader"]),
    ("tasks", ["mtss_train.tasks", "mtss_train.tasks.*"]),
    ("training", ["mtss_train.train", "mtss_train.train.*"]),
    ("evaluation", ["mtss_train.eval", "mtss_train.eval.*", "mtss_train.recalibrate_bn"]),
    ("programs", ["mtss_train.__main__", "mtss_train.export", "mtss_train.ckpt.*",
                  "mtss_train.benchmark", "mtss_train.benchmark.*", "mtss_train.configs", "mtss_train.data.prepare",
                  "mtss_train.data.prepare_images", "mtss_train.data.prepare_masks", "mtss_train.data.beam_io"]),
]


def modules() -> dict[str, str]:
    """Dotted name -> file, for every module of the installed packages."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        root = os.path.join(REPO, folder)
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if os.path.isfile(os.path.join(directory, d, "__init__.py"))]
            parts = os.path.relpath(directory, root).split(os.sep)
            prefix = ".".join([package] + [p for p in parts if p != "."])
            for name in files:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[module] = os.path.join(directory, name)
    return found


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return rank
    raise KeyError(f"{module} is in no layer of {__file__}; add it to LAYERS")


def imports(path: str, known: dict[str, str]) -> Iterator[str]:
    """The project modules `path` imports, at any depth of its code."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` names a module; `from module import name` does not.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in known else node.module for n in names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


def edges() -> dict[tuple[str, str], None]:
    known = modules()
    found: dict[tuple[str, str], None] = {}
    for module, path in sorted(known.items()):
        for target in imports(path, known):
            if target != module and not module.startswith(target + "."):  # A package's own __init__ runs first anyway.
                found[(module, target)] = None
    return found


def upward_edges() -> list[tuple[str, str]]:
    """Imports of a higher layer: (importer, imported)."""
    return [(a, b) for a, b in edges() if layer_of(b) > layer_of(a)]


def dot() -> str:
    """The graph in Graphviz's language: one box per layer listing its modules, programs on
    top, an arrow per pair of layers with the number of imports it stands for (red: up)."""
    by_layer = collections.defaultdict(list)
    for module in sorted(modules()):
        by_layer[layer_of(module)].append(module.removeprefix("mtss_train.") or "mtss_train")
    lines = ["digraph mtss_train {", "  rankdir=TB; node [shape=box, fontsize=10, fontname=monospace];"]
    for rank, (name, _) in enumerate(LAYERS):
        listing = "\\l".join(textwrap.wrap("  ".join(by_layer[rank]), 90)) + "\\l"
        lines.append(f'  layer{rank} [label="{rank}: {name}\\n{listing}"];')
    # Invisible steps down the layers keep each layer on its own row, in order.
    lines += [f"  layer{rank + 1} -> layer{rank} [style=invis];" for rank in range(len(LAYERS) - 1)]
    counts = collections.Counter((layer_of(a), layer_of(b)) for a, b in edges() if layer_of(a) != layer_of(b))
    for (a, b), count in sorted(counts.items()):
        style = ", color=red, penwidth=2" if b > a else ""
        lines.append(f'  layer{a} -> layer{b} [label="{count}"{style}];')
    return "\n".join(lines + ["}"])


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        wrong = upward_edges()
        for a, b in wrong:
            print(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
        return 1 if wrong else 0
    print(dot())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
