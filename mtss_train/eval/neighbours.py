"""Nearest neighbours in block3 feature space: which images the trunk finds alike.

    python -m mtss_train.eval.neighbours --checkpoint CKPT [--compare random] [--compare CKPT2] \
        --data DIR [--queries 8] [--k 8] [--crops 3] [--grid global|3] --out neighbours.png

Judging a self-supervised trunk by eye, as the context-prediction and exemplar papers do:
the same N query images, drawn once from --data, are looked up by cosine similarity of
their block3 features among all other images of --data, once per checkpoint (`random`:
seeded initial weights, the baseline). The PNG has one block per checkpoint side by side,
one row per query: the query, then its K nearest neighbours, most similar first.

With labels (the linear probe's formats: class folders, TFRecords, idx files such as
Fashion-MNIST), each neighbour is framed green when its label is the query's, red when not,
and precision@K (the share of green frames, averaged over --precision_queries seeded
queries, not just the rows shown) is in each block's title with the chance level, and in a
JSON file beside the PNG. A folder of unlabelled photos (or `sample`: the photos bundled with
scikit-image) has no frames; `--crops G` cuts every image into a G x G grid of tiles whose
label is the image they came from, so precision@K then counts neighbours cut from the same
photo. Features are those of `mtss_train.eval.features`, from its cache: global average
pooling by default (--grid 3 uses the probe's 3x3 grid).
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import dataclasses
import hashlib
import os
import sys
from typing import Callable

import numpy as np
from absl import app, flags, logging

from mtss_train import loader
from mtss_train.compat import tf
from mtss_train.data import sample
from mtss_train.data.images import IMAGE_EXTENSIONS
from mtss_train.data.labelled import ClassFolders, LabelledData, fit_square, open_labelled
from mtss_train.errors import DataError, MtssError, cli_main
from mtss_train.eval import compare, linear_probe, plots
from mtss_train.eval import features as feats
from mtss_train.progress import ProgressLine

SAMPLE = "sample"  # --data value: the photos bundled with scikit-image.
UNLABELLED = -1
# Query rows compared per matrix product: bounds memory at chunk x gallery floats.
_CHUNK = 256


class UnlabelledImages(ClassFolders):
    """Image files without labels (every label is -1), read like class-folder images."""

    kind = "images"

    def __init__(self, path: str, files: list[str]):
        LabelledData.__init__(self, path, [])  # Not ClassFolders': it would look for class folders.
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        self.files = sorted(files)
        self.labels = np.full(len(self.files), UNLABELLED, np.int64)


class Crops(LabelledData):
    """Each image of `base` cut into a crops x crops grid of square tiles, row by row; a
    tile's label is the index of its image, so a neighbour "matches" when cut from the same one."""

    kind = "crops"

    def __init__(self, base: LabelledData, crops: int):
        super().__init__(f"{base.path} ({crops}x{crops} crops)")
        self.base, self.crops = base, crops
        self.skipped = base.skipped

    def count(self, limit: int | None = None) -> int | None:
        images = self.base.count(None)
        tiles = None if images is None else images * self.crops**2
        return limit if tiles is None else (tiles if limit is None else min(limit, tiles))

    def fingerprint(self) -> str:
        return hashlib.sha256(f"crops {self.crops}\0{self.base.fingerprint()}".encode()).hexdigest()

    def dataset(self, image_size: int, limit: int | None = None) -> tf.data.Dataset:
        grid, per_image = self.crops, self.crops**2
        images = self.base.dataset(image_size * grid, None if limit is None else -(-limit // per_image))

        def tiles(index: tf.Tensor, image: tf.Tensor) -> tf.data.Dataset:
            cut = tf.reshape(image, [grid, image_size, grid, image_size, 3])
            cut = tf.reshape(tf.transpose(cut, [0, 2, 1, 3, 4]), [per_image, image_size, image_size, 3])
            return tf.data.Dataset.from_tensor_slices((cut, tf.fill([per_image], index)))

        # Indices count decoded images, so a skipped file shifts no label onto another image.
        found = images.enumerate().flat_map(lambda index, pair: tiles(index, pair[0]))
        return found if limit is None else found.take(limit)


def open_gallery(path: str, crops: int = 1) -> LabelledData:
    """The images to search: `sample` (scikit-image's bundled photos), a folder of image
    files (unlabelled), or labelled data in the probe's formats; cut into tiles if crops > 1.

    Raises:
      DataError: the path holds none of these. MtssError: crops < 1.
    """
    if crops < 1:
        raise MtssError(f"--crops must be at least 1, got {crops}")
    if path == SAMPLE:
        data: LabelledData = UnlabelledImages("bundled sample photos", sample.sample_photo_paths())
    elif os.path.isdir(path) and _flat_image_folder(path):
        data = UnlabelledImages(path, [os.path.join(path, n) for n in os.listdir(path)
                                       if n.lower().endswith(IMAGE_EXTENSIONS)])
    else:
        data = open_labelled(path)
    return Crops(data, crops) if crops > 1 else data


def _flat_image_folder(path: str) -> bool:
    """Images directly in `path` and no sub-folder: photos without classes."""
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    return any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names) and not any(
        os.path.isdir(os.path.join(path, n)) for n in names)


def choose_queries(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of `count` query examples, sorted by label. They depend on the labels and the
    seed only, so every checkpoint is shown the same rows; with labels, the classes take
    turns, so 10 queries on a 10-class set show each class once."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if np.all(labels == UNLABELLED):
        return np.sort(order[:count])
    by_class: dict[int, list[int]] = {}
    for index in order:
        by_class.setdefault(int(labels[index]), []).append(int(index))
    turns = [queue[i] for i in range(max(map(len, by_class.values()))) for queue in by_class.values() if i < len(queue)]
    picked = np.array(turns[:count])
    return picked[np.lexsort((picked, labels[picked]))]


def cosine_neighbours(features: np.ndarray, queries: np.ndarray, k: int,
                      label: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar rows of `features` [N, D] to each query row (itself left
    out), most similar first (ties: lower index first).

    Returns:
      (indices int64 [Q, k], similarities float32 [Q, k]).
    """
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = (features / np.maximum(norms, 1e-12)).astype(np.float32)  # An all-zero row is like nothing.
    indices, similarities = [], []
    with ProgressLine(f"neighbours {label}".strip(), len(queries), "queries", enabled=len(queries) > _CHUNK) as line:
        for start in range(0, len(queries), _CHUNK):
            rows = queries[start:start + _CHUNK]
            sims = unit[rows] @ unit.T
            sims[np.arange(len(rows)), rows] = -np.inf
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            indices.append(top)
            similarities.append(np.take_along_axis(sims, top, axis=1))
            line.advance(len(rows))
        if len(queries) > _CHUNK:
            line.finish()
    return np.concatenate(indices).astype(np.int64), np.concatenate(similarities)


def precision_at_k(labels: np.ndarray, queries: np.ndarray, neighbours: np.ndarray) -> float:
    """Share of neighbours [Q, K] whose label is their query's."""
    return float(np.mean(labels[neighbours] == labels[queries][:, None]))


def chance_precision(labels: np.ndarray) -> float:
    """precision@K of neighbours drawn at random: the chance that another example shares a
    random example's label."""
    _, counts = np.unique(labels, return_counts=True)
    return float(np.sum(counts * (counts - 1)) / (len(labels) * (len(labels) - 1)))


@dataclasses.dataclass
class Retrieval:
    """One checkpoint's neighbours of the shown queries and its precision@K."""

    name: str
    trunk: str
    neighbours: np.ndarray  # int64 [queries, k]
    similarities: np.ndarray  # float32 [queries, k]
    precision: float | None  # None without labels.


def retrieve(found: feats.Extracted, queries: np.ndarray, k: int, precision_queries: int, seed: int,
             name: str, trunk: str) -> Retrieval:
    """The neighbours of `queries` in `found`, and precision@k over `precision_queries`
    seeded examples (all if fewer), when the examples have labels."""
    neighbours, sims = cosine_neighbours(found.features, queries, k)
    precision = None
    if not np.all(found.labels == UNLABELLED):
        rng = np.random.default_rng(seed)
        sampled = np.sort(rng.permutation(len(found.labels))[:precision_queries])
        precision = precision_at_k(found.labels, sampled, cosine_neighbours(found.features, sampled, k, name)[0])
    return Retrieval(name, trunk, neighbours, sims, precision)


def row_names(data: LabelledData, labels: np.ndarray) -> list[str]:
    """A row label per query: its class name, `class N`, `image N` (crops), or nothing."""
    if isinstance(data, Crops):
        files = getattr(data.base, "files", None)
        if isinstance(data.base, UnlabelledImages) and data.skipped.count == 0:  # Label i is file i.
            return [os.path.splitext(os.path.basename(files[label]))[0] for label in labels]
        return [f"image {label}" for label in labels]
    if data.classes:
        return [data.classes[label] for label in labels]
    return ["" if label == UNLABELLED else f"class {label}" for label in labels]


@dataclasses.dataclass
class Request:
    """What to show: checkpoints (first one first), data, and the picture's sizes."""

    checkpoints: list[str]
    data: LabelledData
    queries: int = 8
    k: int = 8
    precision_queries: int = 1000
    query_seed: int = 0
    thumb_size: int = 64
    limit: int | None = None
    cache_dir: str | None = None


def run(request: Request, settings: feats.Settings, out: str) -> dict:
    """Features (cached) of every checkpoint, their neighbours, the PNG at `out` and the
    JSON beside it; returns what the JSON holds.

    Raises:
      MtssError: bad sizes or output path; CheckpointError / DataError from the inputs.
    """
    if not out.lower().endswith(".png"):
        raise MtssError(f"--out must name a .png file, got {out!r}")
    for name in ("queries", "k", "precision_queries", "thumb_size"):
        if getattr(request, name) < 1:
            raise MtssError(f"--{name} must be positive, got {getattr(request, name)}")
    per_checkpoint = compare.settings_per_checkpoint(request.checkpoints, settings)
    results, labels, found_meta = [], None, None
    for name, own in per_checkpoint.items():
        model = loader.Trunk(name, own)
        found = feats.load_or_extract(model, request.data, own, request.limit, request.cache_dir,
                                      f"{plots.short_name(name)} on {request.data.path}")
        if labels is None:
            labels, found_meta = found.labels, found.meta
            if len(labels) <= request.k:
                raise DataError(f"{request.data.path} has {len(labels)} usable images: --k {request.k} "
                                f"neighbours need at least {request.k + 1}")
            queries = choose_queries(labels, min(request.queries, len(labels)), request.query_seed)
        results.append(retrieve(found, queries, request.k, request.precision_queries, request.query_seed,
                                name, model.describe()))
    shown = sorted({int(i) for r in results for i in r.neighbours.ravel()} | {int(i) for i in queries})
    thumbs = feats.images_at(request.data, shown, request.thumb_size, request.limit)
    labelled = not np.all(labels == UNLABELLED)
    chance = chance_precision(labels) if labelled else None
    blocks = [plots.NeighbourBlock(
        title=plots.short_name(r.name) + (f"\nprecision@{request.k} {r.precision:.3f} (chance {chance:.3f})"
                                    if labelled else ""),
        neighbours=r.neighbours, similarities=r.similarities) for r in results]
    figure = plots.neighbours_figure(blocks, queries, labels if labelled else None, thumbs,
                                     row_names(request.data, labels[queries]), caption(request, found_meta, labelled))
    plots.save(figure, out)
    summary = {
        "data": request.data.path, "data_kind": request.data.kind, "examples": len(labels),
        "features": {key: found_meta[key] for key in ("grid", "image_size", "feature_shape", "trunk_size")},
        "k": request.k, "query_seed": request.query_seed, "chance_precision": chance,
        "queries": [{"index": int(q), "label": int(labels[q])} for q in queries],
        "checkpoints": [{
            "checkpoint": r.name, "trunk": r.trunk, "precision_at_k": r.precision,
            "precision_queries": min(request.precision_queries, len(labels)) if labelled else 0,
            "neighbours": r.neighbours.tolist(), "neighbour_labels": labels[r.neighbours].tolist(),
            "similarities": np.round(r.similarities, 5).tolist(),
        } for r in results],
        "png": out,
    }
    linear_probe.write_json(summary, json_path(out))
    return summary


def caption(request: Request, meta: dict, labelled: bool) -> str:
    """The picture's first line: data, features and what the frames mean."""
    pool = "global average" if meta["grid"] == "global" else f"{meta['grid']}x{meta['grid']} grid"
    frames = ("  Frames: green = same image, red = another" if isinstance(request.data, Crops)
              else "  Frames: green = same label, red = another") if labelled else ""
    return (f"{request.k} nearest neighbours (cosine, block3 {pool} features, {meta['image_size']} px) "
            f"among {meta['examples']:,} images of {request.data.path}.{frames}")


def json_path(png: str) -> str:
    """The JSON written beside a PNG: same name, .json."""
    return os.path.splitext(png)[0] + ".json"


class TrainingNeighbours:
    """The neighbours picture of fixed held-out images, redrawn by the trainer after every
    evaluation (TensorBoard image `eval/neighbours`, scalar `eval/neighbours/precision_at_k`)
    so a user watches retrieval change over the steps.

    The images are read once (at most `limit`) and kept in memory; only the trunk runs
    again. Photos without labels are cut into 2x2 tiles labelled by their photo (see
    `Crops`), so precision@K means "finds the other parts of the same photo"; labelled
    data keeps its labels.
    """

    def __init__(self, data: LabelledData, image_size: int, limit: int = 128, queries: int = 6, k: int = 6,
                 thumb_size: int = 48):
        pairs = list(data.dataset(image_size, limit).as_numpy_iterator())
        if len(pairs) <= k:
            raise DataError(f"{data.path} has {len(pairs)} usable images; the neighbours picture needs {k + 1}")
        self.images = np.stack([image for image, _ in pairs])
        self.labels = np.array([label for _, label in pairs], np.int64)
        self.queries = choose_queries(self.labels, queries, seed=0)
        shown = _thumbnails(self.images, thumb_size)
        self.thumbs = {i: shown[i] for i in range(len(shown))}
        self.k, self.data = k, data
        self._row_names = row_names(data, self.labels[self.queries])

    def picture(self, block3: Callable[[tf.Tensor], tf.Tensor], step: int) -> tuple[np.ndarray, float]:
        """(RGB uint8 [H, W, 3] picture, precision@K over every image as a query) of the trunk
        `block3` (RGB images `[N, S, S, 3]` in [0, 255] -> block3 `[N, h, w, C]`, inference mode)."""
        features = np.concatenate([feats.grid_pool(block3(tf.constant(self.images[i:i + 32], tf.float32)), None).numpy()
                                   for i in range(0, len(self.images), 32)])
        everyone = np.arange(len(self.labels))  # Few (at most 128): every image is a query.
        neighbours, sims = cosine_neighbours(features, everyone, self.k)
        precision = precision_at_k(self.labels, everyone, neighbours)
        neighbours, sims = neighbours[self.queries], sims[self.queries]
        block = plots.NeighbourBlock(f"step {step:,}: precision@{self.k} {precision:.3f} "
                                     f"(chance {chance_precision(self.labels):.3f})", neighbours, sims)
        frames = "same image" if isinstance(self.data, Crops) else "same label"
        figure = plots.neighbours_figure([block], self.queries, self.labels, self.thumbs, self._row_names,
                                         f"Nearest neighbours among {len(self.labels)} images of {self.data.path} "
                                         f"(block3, global average, cosine); green: {frames}")
        return plots.to_rgb(figure), precision

    def write(self, writer: tf.summary.SummaryWriter, step: int, block3: Callable[[tf.Tensor], tf.Tensor]) -> None:
        """The picture and its precision@K as TensorBoard summaries at `step`."""
        image, precision = self.picture(block3, step)
        with writer.as_default(step=step):
            tf.summary.image("eval/neighbours", image[None], max_outputs=1)
            tf.summary.scalar("eval/neighbours/precision_at_k", precision)


def _thumbnails(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, S, S, 3] -> [N, size, size, 3], resized as the evaluation data is."""
    return np.stack([fit_square(image, size) for image in images])


def training_neighbours(path: str, trunk_size: str) -> TrainingNeighbours | None:
    """The trainer's neighbours picture of the --eval_data images, or None (with a warning
    saying why) when it cannot be drawn: a picture must never stop a training run."""
    try:
        data = open_gallery(path)
        if isinstance(data, UnlabelledImages):
            data = Crops(data, 2)
        return TrainingNeighbours(data, feats.DEFAULT_IMAGE_SIZE[trunk_size])
    except MtssError as e:
        logging.warning("no eval/neighbours picture of %s: %s", path, e)
        return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {' '.join(argv[1:])}; more checkpoints go in --compare")
    values = flags.FLAGS
    settings = feats.settings_from_flags()
    extra = [name.strip() for value in values.compare or [] for name in value.split(",") if name.strip()]
    request = Request(checkpoints=[values.checkpoint, *extra], data=open_gallery(values.data, values.crops),
                      queries=values.queries, k=values.k, precision_queries=values.precision_queries,
                      query_seed=values.query_seed, thumb_size=values.thumb_size, limit=values.limit,
                      cache_dir=values.cache_dir or None)
    summary = run(request, settings, values.out)
    for found in summary["checkpoints"]:
        precision = found["precision_at_k"]
        print(f"{found['trunk']}: " + (f"precision@{summary['k']} {precision:.4f} over {found['precision_queries']:,} "
                                       f"queries (chance {summary['chance_precision']:.4f})"
                                       if precision is not None else "no labels, no precision"), file=sys.stderr)
    print(values.out)
    print(json_path(values.out))


if __name__ == "__main__":
    feats.define_extraction_flags()
    flags.FLAGS.set_default("grid", "global")  # Neighbours of whole images, not of 3x3 layouts.
    flags.DEFINE_string("checkpoint", None, "Checkpoint (prefix, file or train dir) or `random`.", required=True)
    flags.DEFINE_multi_string("compare", [], "More checkpoints (or `random`) shown beside --checkpoint; "
                              "repeat the flag or separate with commas.")
    flags.DEFINE_string("data", None, "Images to search: labelled data (class folders, TFRecords, idx files), a "
                        f"folder of photos, or `{SAMPLE}` (the photos bundled with scikit-image).", required=True)
    flags.DEFINE_integer("queries", 8, "Query images shown, one row each.")
    flags.DEFINE_integer("k", 8, "Neighbours per query.")
    flags.DEFINE_integer("crops", 1, "Cut every image into a GxG grid of tiles (label: the image it came from).")
    flags.DEFINE_integer("precision_queries", 1000, "Seeded queries precision@K is averaged over (all if fewer).")
    flags.DEFINE_integer("query_seed", 0, "Seed that picks the queries.")
    flags.DEFINE_integer("thumb_size", 64, "Side of each image in the picture, in pixels.")
    flags.DEFINE_string("out", None, "PNG to write; the JSON goes beside it (same name, .json).", required=True)
    app.run(cli_main(main))
