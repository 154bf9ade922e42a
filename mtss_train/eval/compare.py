"""The linear probe for several checkpoints on the same data, as one table.

    python -m mtss_train.eval.compare random runs/rp runs/rp_col_ex_ms \
        --train DATA --test DATA [--out results.json]

Each CKPT (a checkpoint prefix, file or train dir, or `random` for seeded initial weights)
goes through `mtss_train.eval.linear_probe` with the same data, grid, image size,
penalty grid and `--recalibrate_bn` setting (the table's BN column: `stored`, or `recal. N`
for statistics re-estimated on N training images). The table is printed; --out also writes
every probe's JSON result, and beside it their test confusion matrices side by side
(.confusion.png) and per-class accuracies as bars per checkpoint (.per_class.png). All
checkpoints are checked before any feature is extracted, so a bad one fails at once.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import os

# The probe's matrix products are thin and memory-bound: more BLAS threads barely speed them
# up, and on a busy machine their spin-waiting made the probe ~6x slower (measured). This
# only acts before numpy loads, i.e. when this module is the program.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses
import sys

from absl import app, flags

from mtss_train import loader
from mtss_train.errors import MtssError, cli_main
from mtss_train.eval import features as feats
from mtss_train.eval import linear_probe

COLUMNS = ("checkpoint", "trunk", "BN", "top-1", "top-5", "val top-1", "l2", "features", "train/test", "seconds")


def settings_per_checkpoint(names: list[str], settings: feats.Settings) -> dict[str, feats.Settings]:
    """Each checkpoint's settings. Without a trunk size, `random` takes the size the real
    checkpoints hold, so it is the baseline of the same network.

    Raises:
      CheckpointError: a checkpoint does not exist. MtssError: no name given, or `random`
        cannot tell which size to use.
    """
    if not names:
        raise MtssError("no checkpoint to compare: pass one or more CKPT (or `random`) as arguments")
    trunks = {name: loader.Trunk(name, settings) for name in names}  # A missing checkpoint fails here.
    if settings.trunk_size is not None:
        return {name: settings for name in names}
    sizes = {name: model.size for name, model in trunks.items() if name != loader.RANDOM}
    random_size = "101"
    if len(set(sizes.values())) > 1:
        if loader.RANDOM in names:
            listed = ", ".join(f"{n} ({s})" for n, s in sizes.items())
            raise MtssError(f"the checkpoints hold different trunk sizes ({listed}); pass --trunk_size for `random`")
    elif sizes:
        random_size = next(iter(sizes.values()))
    return {name: dataclasses.replace(settings, trunk_size=sizes.get(name, random_size)) for name in names}


def table(results: list[dict]) -> str:
    """One row per probe result, columns aligned."""
    rows = [COLUMNS] + [(
        r["checkpoint"], r["trunk_size"], bn_column(r.get("recalibrate_bn")), f"{r['test_top1']:.4f}",
        f"{r['test_top5']:.4f}", f"{r['val_top1']:.4f}", f"{r['chosen_l2']:g}",
        "x".join(str(d) for d in r["feature_shape"]),
        f"{r['train_examples']}/{r['test_examples']}",
        f"{r['seconds']['features'] + r['seconds']['probe']:.0f}",
    ) for r in results]
    return aligned(rows)


def bn_column(recalibrated: dict | None) -> str:
    """How the BatchNorm statistics were set: as stored, or re-estimated on N images."""
    return f"recal. {recalibrated['images']}" if recalibrated else "stored"


def aligned(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as text columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def main(argv: list[str]) -> None:
    values = flags.FLAGS
    settings, probe_args = feats.settings_from_flags(), linear_probe.probe_args_from_flags()
    per_checkpoint = settings_per_checkpoint(argv[1:], settings)
    train, test = linear_probe.open_splits(values.train, values.test)
    results = []
    for name, own_settings in per_checkpoint.items():
        results.append(linear_probe.run_probe(name, train, test, own_settings, values.limit,
                                              values.cache_dir or None, **probe_args))
        print(linear_probe.summary(results[-1]), file=sys.stderr)
    print(table(results))
    if values.out:
        linear_probe.write_json({"train": values.train, "test": values.test, "results": results}, values.out)
        print(f"results: {values.out}")
        for path in linear_probe.write_pictures(results, train.classes, values.out):
            print(f"picture: {path}")


if __name__ == "__main__":
    feats.define_extraction_flags()
    linear_probe.define_probe_flags()
    app.run(cli_main(main))
