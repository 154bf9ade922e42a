"""Linear probe: a multinomial logistic regression on frozen block3 features.

    python -m mtss_train.eval.linear_probe --checkpoint CKPT --train DATA --test DATA \
        [--trunk_size 101|tiny] [--grid 3|global] [--recalibrate_bn] [--out result.json]

With --out X.json, the test confusion matrix and per-class accuracies are also drawn beside
it (X.confusion.png, X.per_class.png).

As the paper judges a representation: block3 features of the frozen trunk, averaged over a
3x3 grid of cells (or globally), standardised with the training data's mean and deviation,
then softmax regression with an L2 penalty fitted by full-batch L-BFGS (scipy's L-BFGS-B
without bounds, on a numpy objective). The penalty is chosen by top-1 accuracy on a
validation split carved from the training data (never the test data); the classifier is
then refitted on all training data and scored once on the test data (top-1, top-5).
`--checkpoint random` probes seeded random initial weights, the baseline a pre-trained
trunk should beat. Features come from the cache of `mtss_train.eval.features`, so a rerun
with other penalties never runs the trunk.

`--recalibrate_bn` first re-estimates the trunk's BatchNorm statistics on the training
images (`mtss_train.recalibrate_bn`; never on the test images), for trunks whose moving
statistics were averaged over other inputs; the JSON records on how many images.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import os

# The probe's matrix products are thin and memory-bound: more BLAS threads barely speed them
# up, and on a busy machine their spin-waiting made the probe ~6x slower (measured). This
# only acts before numpy loads, i.e. when this module is the program.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import pathlib
import sys
import time
from typing import Callable

import numpy as np
from absl import app, flags
from scipy import optimize

from mtss_train import loader, recalibrate_bn
from mtss_train.data.files import write_atomically
from mtss_train.data.labelled import LabelledData, open_labelled
from mtss_train.errors import DataError, MtssError, cli_main
from mtss_train.eval import features as feats
from mtss_train.eval import plots

# Pictures and the JSON's confusion matrix stop here: beyond, they are unreadable or huge.
MAX_CONFUSION_CLASSES = 50
MAX_PER_CLASS_BARS = 100
# Penalties tried, strongest first (each fit warm-starts the next): 1e0 ... 1e-6.
DEFAULT_L2_GRID = tuple(float(f"{10 ** (-k / 2):.3g}") for k in range(13))
Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


def standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scales every feature to zero mean, unit deviation over `fit` [N, D]; same map for `others`.
    Constant features (e.g. dead ReLUs) become 0."""
    mean = fit.mean(axis=0, dtype=np.float64)
    scale = fit.std(axis=0, dtype=np.float64)
    scale[scale < 1e-8] = 1.0
    return [((x - mean) / scale).astype(np.float32) for x in (fit, *others)]


def logistic_objective(x: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> Objective:
    """f(params) = mean cross-entropy + l2/2 |W|^2 and its gradient, params = [W; b] flattened
    ([D + 1, K]); the bias is not penalised. x: float32 [N, D]; labels: int [N] in [0, K)."""
    n, dims = x.shape
    onehot = np.eye(num_classes, dtype=np.float32)[labels]

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        weights = params[: dims * num_classes].reshape(dims, num_classes)
        bias = params[dims * num_classes:]
        logits = (x @ weights.astype(np.float32)).astype(np.float64) + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -np.sum((logits - log_z) * onehot) / n + 0.5 * l2 * np.sum(weights**2)
        residual = (np.exp(logits - log_z) - onehot) / n  # d(mean CE)/d(logits)
        grad_w = (x.T @ residual.astype(np.float32)).astype(np.float64) + l2 * weights
        return float(loss), np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

    return objective


class Classifier:
    """Softmax regression: weights [D, K], bias [K]."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, info: dict):
        self.weights, self.bias, self.info = weights, bias, info

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights.astype(np.float32) + self.bias.astype(np.float32)

    def params(self) -> np.ndarray:
        return np.concatenate([self.weights.ravel(), self.bias])


def fit(x: np.ndarray, labels: np.ndarray, num_classes: int, l2: float,
        start: Classifier | None = None, max_iter: int = 1000, tol: float = 1e-4) -> Classifier:
    """L2-regularised softmax regression on x [N, D] float32, labels [N] in [0, K), by L-BFGS
    (10 correction pairs) from `start` (zeros without one).

    It stops when the largest gradient entry is at most `tol` or an iteration lowers the
    loss by a relative 2.2e-9 at most (`converged`), after `max_iter` iterations, or when a
    line search finds no lower loss, as happens once a step changes the loss by less than
    the rounding of the float32 products. The classifier's info has `converged`, scipy's
    reason (`stop`), the iterations, the loss and the largest gradient entry.
    """
    dims = x.shape[1]
    params0 = start.params() if start is not None else np.zeros((dims + 1) * num_classes)
    found = optimize.minimize(logistic_objective(x, labels, num_classes, l2), params0, jac=True, method="L-BFGS-B",
                              options={"maxiter": max_iter, "gtol": tol, "maxcor": 10})
    info = {"iterations": int(found.nit), "converged": bool(found.success), "stop": str(found.message),
            "loss": float(found.fun), "grad_max": float(np.abs(found.jac).max())}
    return Classifier(found.x[: dims * num_classes].reshape(dims, num_classes), found.x[dims * num_classes:], info)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits (label -1 never is)."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def split_validation(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): a seeded random `fraction` of range(count) held out."""
    if not 0 < fraction < 1:
        raise MtssError(f"--val_fraction must be between 0 and 1, got {fraction}")
    held = round(count * fraction)
    if held < 1 or held >= count:
        raise DataError(f"{count} training examples are too few to hold out {fraction:.0%} for validation")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          l2_grid: tuple[float, ...] = DEFAULT_L2_GRID, val_fraction: float = 0.2, seed: int = 0,
          max_iter: int = 1000, patience: int = 2) -> dict:
    """Chooses the penalty on a validation split of the training data, refits on all of it,
    and scores the test data once.

    Args:
      train_x: training features, float32 [N, D].
      train_y: training labels, integers [N].
      test_x: test features, float32 [M, D].
      test_y: test labels, integers [M].
      l2_grid: penalties, tried strongest first; the sweep stops once `patience` weaker
        ones after the best scored lower (validation accuracy is unimodal in practice).
      val_fraction: share of the training data held out to choose the penalty.
      seed: of the validation split.
      max_iter: L-BFGS iterations per fit, at most.
      patience: see `l2_grid`.

    Returns:
      JSON-able results: chosen l2, validation top-1 per l2, train/test top-1 and top-5.

    Raises:
      DataError: fewer than 2 classes, or too few examples to hold some out.
    """
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise DataError(f"the training data has {len(classes)} class(es); a classifier needs at least 2")
    y_fit_all = np.searchsorted(classes, train_y)
    # Test labels the training data never shows can never be predicted: they count as errors.
    known = np.isin(test_y, classes)
    y_test = np.where(known, np.searchsorted(classes, test_y).clip(0, len(classes) - 1), -1)
    fit_idx, val_idx = split_validation(len(train_y), val_fraction, seed)
    fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])
    val_top1, models, previous = {}, {}, None
    for l2 in sorted(l2_grid, reverse=True):  # Strong to weak: each fit warm-starts the next.
        models[l2] = previous = fit(fit_x, y_fit_all[fit_idx], len(classes), l2, start=previous, max_iter=max_iter)
        val_top1[l2] = topk_accuracy(models[l2].logits(val_x), y_fit_all[val_idx], 1)
        best = max(val_top1, key=lambda v: (val_top1[v], v))  # Ties: the stronger penalty.
        if sum(v < best for v in val_top1) >= patience:
            break  # Validation accuracy fell `patience` times in a row past its peak.
    all_x, test_std = standardize(train_x, test_x)
    final = fit(all_x, y_fit_all, len(classes), best, start=models[best], max_iter=max_iter)
    k = min(5, len(classes))
    test_logits = final.logits(test_std)
    confusion = confusion_matrix(y_test, test_logits.argmax(axis=1), len(classes))
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {
        "classes": len(classes), "fit_examples": len(fit_idx), "val_examples": len(val_idx),
        "train_examples": len(train_y), "test_examples": len(test_y),
        "test_examples_of_unseen_classes": int(np.sum(~known)),
        "val_fraction": val_fraction, "seed": seed, "l2_grid": sorted(l2_grid), "patience": patience,
        "val_top1_by_l2": {f"{l2:g}": round(v, 5) for l2, v in sorted(val_top1.items())},
        "chosen_l2": best, "val_top1": val_top1[best],
        "train_top1": topk_accuracy(final.logits(all_x), y_fit_all, 1),
        "test_top1": topk_accuracy(test_logits, y_test, 1), "test_top5": topk_accuracy(test_logits, y_test, k),
        "top5_k": k, "solver": {**final.info, "method": "L-BFGS-B (scipy.optimize.minimize), full batch"},
        "class_labels": classes.tolist(), "test_top1_per_class": [round(float(v), 5) for v in per_class],
        # Rows: true class, columns: predicted, in class_labels order; left out for many classes (ImageNet's
        # would be a million numbers).
        "confusion": confusion.tolist() if len(classes) <= MAX_CONFUSION_CLASSES else None,
    }


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K, K] counts of (true, predicted) class pairs; labels -1 (classes the training
    data never showed) are left out."""
    known = labels >= 0
    counts = np.zeros([num_classes, num_classes], np.int64)
    np.add.at(counts, (labels[known], predicted[known]), 1)
    return counts


def class_names(result: dict, names: list[str] | None) -> list[str]:
    """The names of a result's classes: folder names, else the stored label numbers."""
    return [names[c] if names and c < len(names) else str(c) for c in result["class_labels"]]


def write_pictures(results: list[dict], names: list[str] | None, json_path: str) -> list[str]:
    """Beside `json_path` (`X.json`): `X.confusion.png`, the test confusion matrix of each
    result side by side (up to MAX_CONFUSION_CLASSES classes), and `X.per_class.png`, test
    accuracy per class with a bar per result. Returns the files written."""
    stem = os.path.splitext(json_path)[0]
    labels = class_names(results[0], names)
    titles = [f"{plots.short_name(r['checkpoint'])}: top-1 {r['test_top1']:.3f}" for r in results]
    where = f"{results[0]['test_data']['data']}, {results[0]['test_examples']:,} test images"
    written = []
    if all(r["confusion"] is not None for r in results):
        figure = plots.confusion_figure([(t, np.array(r["confusion"])) for t, r in zip(titles, results)], labels,
                                        f"Linear probe test confusion, % of each true class ({where})")
        plots.save(figure, stem + ".confusion.png")
        written.append(stem + ".confusion.png")
    if len(labels) <= MAX_PER_CLASS_BARS:
        figure = plots.per_class_figure([(t, np.array(r["test_top1_per_class"])) for t, r in zip(titles, results)],
                                        labels, f"Linear probe test accuracy per class ({where})")
        plots.save(figure, stem + ".per_class.png")
        written.append(stem + ".per_class.png")
    return written


def run_probe(checkpoint: str, train: LabelledData, test: LabelledData, settings: feats.Settings,
              limit: int | None, cache_dir: str | None, recalibrate_batches: int | None = None,
              **probe_args) -> dict:
    """Features of both splits (cached) through the trunk of `checkpoint`, then `probe`.

    With `recalibrate_batches`, the trunk's BatchNorm statistics are first re-estimated on
    that many batches of `settings.batch_size` training images (within `limit`), never on
    test images (`mtss_train.recalibrate_bn`).
    """
    start = time.monotonic()
    if recalibrate_batches:
        model = recalibrate_bn.RecalibratedTrunk(checkpoint, settings, train, recalibrate_batches, limit)
    else:
        model = loader.Trunk(checkpoint, settings)
    found = {name: feats.load_or_extract(model, data, settings, limit, cache_dir, f"{name} {data.path}")
             for name, data in (("train", train), ("test", test))}
    extracted = time.monotonic()
    result = probe(found["train"].features, found["train"].labels, found["test"].features,
                   found["test"].labels, **probe_args)
    meta = found["train"].meta
    return {
        "checkpoint": checkpoint, "trunk": model.describe(), "checkpoint_digest": model.digest,
        **{key: meta[key] for key in ("trunk_size", "output_stride", "grid", "image_size", "feature_shape")},
        "limit": limit, "recalibrate_bn": meta.get("recalibrate_bn"),
        **{f"{name}_data": _data_summary(f.meta) for name, f in found.items()},
        **result, "seconds": {"features": round(extracted - start, 2),
                              "probe": round(time.monotonic() - extracted, 2)},
    }


def _data_summary(meta: dict) -> dict:
    return {key: meta.get(key) for key in ("data", "data_kind", "examples", "skipped", "cache")}


def summary(result: dict) -> str:
    recalibrated = result.get("recalibrate_bn")
    trunk = result["trunk"] + (f" (BN recalibrated on {recalibrated['images']:,} training images)"
                               if recalibrated else "")
    return (f"{trunk}: test top-1 {result['test_top1']:.4f}, top-{result['top5_k']} "
            f"{result['test_top5']:.4f} ({result['test_examples']:,} test, {result['classes']} classes); "
            f"l2 {result['chosen_l2']:g} chosen on {result['val_examples']:,} validation examples "
            f"(val top-1 {result['val_top1']:.4f})")


def define_probe_flags() -> None:
    """Data and classifier flags shared by the probe and the comparison."""
    flags.DEFINE_string("train", None, "Labelled training data: class folders, TFRecords or idx files.", required=True)
    flags.DEFINE_string("test", None, "Labelled test data, same layout.", required=True)
    flags.DEFINE_string("out", None, "JSON result file (without it, the probe prints the JSON); the confusion "
                        "matrix and per-class accuracy pictures go beside it (.confusion.png, .per_class.png).")
    flags.DEFINE_list("l2_grid", [f"{v:g}" for v in DEFAULT_L2_GRID], "L2 penalties to choose from.")
    flags.DEFINE_float("val_fraction", 0.2, "Share of the training data held out to choose the penalty.")
    flags.DEFINE_integer("max_iter", 1000, "L-BFGS iterations per fit, at most.")
    flags.DEFINE_bool("recalibrate_bn", False, "Re-estimate the trunk's BatchNorm statistics on the training "
                      "images (never the test images) before extracting features (mtss_train.recalibrate_bn).")
    flags.DEFINE_integer("recalibrate_batches", recalibrate_bn.DEFAULT_BATCHES, "With --recalibrate_bn: "
                         "batches of --batch_size training images (within --limit) to estimate them on, at most.")


def probe_args_from_flags() -> dict:
    values = flags.FLAGS
    try:
        grid = tuple(float(v) for v in values.l2_grid)
    except ValueError:
        raise MtssError(f"--l2_grid must be numbers, got {','.join(values.l2_grid)}") from None
    if not grid or min(grid) < 0:
        raise MtssError("--l2_grid needs at least one penalty >= 0")
    if values.recalibrate_batches < 1:
        raise MtssError(f"--recalibrate_batches must be positive, got {values.recalibrate_batches}")
    return {"l2_grid": grid, "val_fraction": values.val_fraction, "seed": values.seed, "max_iter": values.max_iter,
            "recalibrate_batches": values.recalibrate_batches if values.recalibrate_bn else None}


def open_splits(train_path: str, test_path: str) -> tuple[LabelledData, LabelledData]:
    """Training and test data; a test split in class folders uses the training classes."""
    train = open_labelled(train_path)
    return train, open_labelled(test_path, classes=train.classes)


def write_json(result: object, path: str | None) -> None:
    """Writes `result` as JSON to `path` atomically (a reader or a kill never sees half of
    it), or to stdout when `path` is None."""
    text = json.dumps(result, indent=2) + "\n"
    if path is None:
        sys.stdout.write(text)
        return
    try:
        write_atomically(path, lambda temporary: pathlib.Path(temporary).write_text(text))
    except OSError as e:
        raise MtssError(f"cannot write result {path}: {e.strerror or e}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {' '.join(argv[1:])}; the checkpoint is --checkpoint")
    values = flags.FLAGS
    settings, probe_args = feats.settings_from_flags(), probe_args_from_flags()
    train, test = open_splits(values.train, values.test)
    result = run_probe(values.checkpoint, train, test, settings, values.limit, values.cache_dir or None,
                       **probe_args)
    print(summary(result), file=sys.stderr if values.out is None else sys.stdout)
    write_json(result, values.out)
    if values.out:
        for path in write_pictures([result], train.classes, values.out):
            print(path)


if __name__ == "__main__":
    feats.define_extraction_flags()
    define_probe_flags()
    flags.DEFINE_string("checkpoint", None, "Checkpoint (prefix, file or train dir) or `random`.", required=True)
    app.run(cli_main(main))
