"""Frozen block3 features of labelled images: batched extraction, a disk cache, export.

    python -m mtss_train.eval.features --checkpoint CKPT --data DATA --out DIR [--format npy|tfrecord]
    python -m mtss_train.eval.features --checkpoint CKPT --data DATA --projector LOGDIR [--limit 5000]

The trunk (a slim-name checkpoint, or `random`: seeded initial weights) runs in inference
mode (BatchNorm uses its moving statistics, as stored or re-estimated on other images by
`mtss_train.recalibrate_bn.RecalibratedTrunk`) on RGB images resized to S x S
(`mtss_train.data.labelled`). Its block3 output [N, h, w, C] is average-pooled to a G x G
grid (adaptive bins as in PyTorch's AdaptiveAvgPool2d: bin i spans rows
floor(i*h/G) .. ceil((i+1)*h/G) - 1, so G may exceed h) and flattened in (row, column,
channel) order to [N, G*G*C], or pooled globally to [N, C].

Features are cached on disk under a key made of the trunk's digest (the checkpoint's
content, and the recalibration's data and settings if any), the data's identity (files,
sizes, modification times, class mapping) and every setting that changes them, so a second
probe or a regulariser sweep never runs the trunk again.

`--projector LOGDIR` writes them for TensorBoard's embedding projector, with a sprite of the
images and their labels (`write_projector`): `tensorboard --logdir LOGDIR` shows them in 3-D
(PCA, t-SNE, UMAP). Use --grid global (1024 numbers per image, not 9216) and a --limit of a
few thousand images: the projector runs in the browser.
"""

from mtss_train import startup  # noqa: F401  First: quiets TensorFlow's start-up logs.

import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable

import cv2
import numpy as np
from absl import app, flags, logging

from mtss_train.model import trunk
from mtss_train.compat import tf
from mtss_train.data.files import write_atomically
from mtss_train.data.labelled import TFRECORD_LABEL_KEY, LabelledData, open_labelled
from mtss_train.errors import DataError, MtssError, cli_main
from mtss_train.loader import Trunk, TrunkSettings
from mtss_train.progress import ProgressLine

FEATURES_KEY = "features"
FORMATS = ("npy", "tfrecord")
# Bump when extraction changes what it computes, so old cache entries stop matching.
CACHE_VERSION = 1
DEFAULT_IMAGE_SIZE = {"101": 224, "tiny": 96}


@dataclasses.dataclass(frozen=True)
class Settings(TrunkSettings):
    """How features are computed: the trunk (`TrunkSettings`), then None grid: global
    pooling; None image_size: DEFAULT_IMAGE_SIZE of the trunk."""

    grid: int | None = 3
    image_size: int | None = None
    batch_size: int = 64


def grid_pool(block3: tf.Tensor, grid: int | None) -> tf.Tensor:
    """[N, h, w, C] -> [N, grid*grid*C] cell averages in (row, column, channel) order, or
    [N, C] global averages when grid is None. h and w must be static."""
    if grid is None:
        return tf.reduce_mean(block3, axis=[1, 2])
    height, width = block3.shape[1], block3.shape[2]
    cells = []
    for row in range(grid):
        top, bottom = row * height // grid, -(-(row + 1) * height // grid)
        for col in range(grid):
            left, right = col * width // grid, -(-(col + 1) * width // grid)
            cells.append(tf.reduce_mean(block3[:, top:bottom, left:right, :], axis=[1, 2]))
    return tf.concat(cells, axis=1)


@dataclasses.dataclass
class Extracted:
    """features float32 [N, D]; labels int64 [N]; meta: what made them (JSON-able)."""

    features: np.ndarray
    labels: np.ndarray
    meta: dict


def extract(model: Trunk, data: LabelledData, settings: Settings, limit: int | None, label: str) -> Extracted:
    """Runs the trunk over `data` in batches, with a progress line on stderr."""
    size = settings.image_size or DEFAULT_IMAGE_SIZE[model.size]
    extractor = model.extractor
    features_fn = tf.function(lambda images: grid_pool(extractor(images), settings.grid))
    batches = data.dataset(size, limit).batch(settings.batch_size).prefetch(2)
    chunks, labels = [], []
    with ProgressLine(f"features of {label}", data.count(limit), "images") as progress:
        for images, batch_labels in batches:
            chunks.append(features_fn(images).numpy())
            labels.append(batch_labels.numpy())
            progress.advance(len(chunks[-1]))
        seconds = progress.finish()
    if not chunks:
        raise DataError(f"no image of {data.path} could be decoded ({data.skipped.count} unreadable)")
    cells = 1 if settings.grid is None else settings.grid**2
    shape = ([] if settings.grid is None else [settings.grid] * 2) + [chunks[0].shape[1] // cells]
    meta = {"checkpoint": model.describe(), "trunk_size": model.size, "output_stride": model.output_stride,
            "grid": settings.grid or "global", "image_size": size, "feature_shape": shape,
            "data": data.path, "data_kind": data.kind, "classes": data.classes, "limit": limit,
            "examples": int(sum(len(x) for x in labels)), "skipped": data.skipped.count,
            "extraction_seconds": round(seconds, 2), "recalibrate_bn": model.recalibrate_bn}
    return Extracted(np.concatenate(chunks), np.concatenate(labels), meta)


def cache_key(model: Trunk, data: LabelledData, settings: Settings, limit: int | None) -> str:
    """Identifies the features: checkpoint content, data identity and the settings used."""
    material = {"version": CACHE_VERSION, "checkpoint": model.digest, "trunk_size": model.size,
                "output_stride": model.output_stride, "grid": settings.grid,
                "image_size": settings.image_size or DEFAULT_IMAGE_SIZE[model.size],
                "data": data.fingerprint(), "limit": limit}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def load_or_extract(model: Trunk, data: LabelledData, settings: Settings, limit: int | None,
                    cache_dir: str | None, label: str) -> Extracted:
    """The features from the cache if `cache_dir` has them, else extracted (and cached)."""
    if not cache_dir:
        return extract(model, data, settings, limit, label)
    key = cache_key(model, data, settings, limit)
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                print(f"features of {label}: {len(stored['labels']):,} from the cache ({path})", file=sys.stderr)
                return Extracted(stored["features"], stored["labels"], {**meta, "cache": path})
        except (OSError, ValueError, KeyError) as e:  # A damaged entry is recomputed, not fatal.
            logging.warning("ignoring unreadable feature cache %s: %s", path, e)
    found = extract(model, data, settings, limit, label)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_atomically(path, lambda tmp: _save(tmp, np.savez, features=found.features,
                                                 labels=found.labels, meta=json.dumps(found.meta)))
        found.meta["cache"] = path
    except OSError as e:  # The features are fine; only the next run will be slower.
        logging.warning("could not cache features in %s: %s", cache_dir, e)
    return found


def images_at(data: LabelledData, indices: list[int], size: int, limit: int | None = None) -> dict[int, np.ndarray]:
    """The images at `indices` of the order `extract` reads `data` in (row i of its
    features), as uint8 [size, size, 3]: pictures of what features describe."""
    wanted = set(int(i) for i in indices)
    if not wanted:
        return {}
    found = {}
    images = data.dataset(size, limit).take(max(wanted) + 1)
    with ProgressLine(f"images of {data.path}", len(wanted), "images") as progress:
        for index, (image, _) in enumerate(images.as_numpy_iterator()):
            if index in wanted:
                found[index] = image
                progress.advance()
    return found


def _save(path: str, save: Callable[..., None], *args: object, **kwargs: object) -> None:
    """numpy's save/savez to exactly `path` (given a name, they would append a suffix)."""
    with open(path, "wb") as f:
        save(f, *args, **kwargs)


def export(found: Extracted, out_dir: str, fmt: str) -> list[str]:
    """Writes features for external tools; returns the files written.

    npy: `features.npy` float32 [N, D], `labels.npy` int64 [N]. tfrecord: `features.tfrecord`
    of tf.train.Examples with float `features` [D] and int64 `image/class/label`. Both write
    `meta.json` (checkpoint, data, settings, `feature_shape` [G, G, C] or [C]).

    Raises:
      MtssError: if `fmt` is unknown or `out_dir` cannot be written.
    """
    if fmt not in FORMATS:
        raise MtssError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    files = {"npy": ["features.npy", "labels.npy"], "tfrecord": ["features.tfrecord"]}[fmt] + ["meta.json"]
    writers = {
        "features.npy": lambda f: _save(f, np.save, found.features.astype(np.float32)),
        "labels.npy": lambda f: _save(f, np.save, found.labels.astype(np.int64)),
        "features.tfrecord": lambda f: _write_records(f, found.features, found.labels),
        "meta.json": lambda f: _save(f, lambda h: h.write(json.dumps(found.meta, indent=2).encode() + b"\n")),
    }
    return _write_files(out_dir, {name: writers[name] for name in files}, "features")


def _write_files(directory: str, writers: dict[str, Callable[[str], None]], what: str) -> list[str]:
    """Writes each file of `writers` (name -> writer of a temporary path) in `directory`,
    atomically; returns their paths.

    Raises:
      MtssError: `directory` cannot be written.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        for name, write in writers.items():
            write_atomically(os.path.join(directory, name), write)
    except OSError as e:
        raise MtssError(f"cannot write {what} to {directory}: {e.strerror or e}") from None
    return [os.path.join(directory, name) for name in writers]


# TensorBoard's projector shows a sprite of at most this many pixels per side.
SPRITE_MAX_SIDE = 8192
PROJECTOR_FILES = ("features.tsv", "metadata.tsv", "sprite.png", "projector_config.pbtxt")


def write_projector(found: Extracted, data: LabelledData, logdir: str, thumb_size: int = 48,
                    limit: int | None = None) -> list[str]:
    """Writes what TensorBoard's embedding projector reads (`tensorboard --logdir LOGDIR`,
    Projector tab: PCA, t-SNE, UMAP of the images, coloured and labelled by class).

    In `logdir`: `features.tsv` (a row of tab-separated floats per image, the projector's
    text tensor format), `metadata.tsv` (a header, then index, label and class per image),
    `sprite.png` (the images in a square grid, row by row, shrunk so the grid fits the
    projector's 8192 px limit) and `projector_config.pbtxt`, with paths relative to
    `logdir` so the directory can be moved. `found` must be the features of `data` read
    with `limit`, so row i is image i. Returns the files written.

    Raises:
      MtssError: `logdir` cannot be written. DataError: the images no longer match the features.
    """
    # TensorFlow's dependencies (tensorboard, protobuf), needed only here.
    from google.protobuf import text_format
    from tensorboard.plugins import projector

    count = len(found.labels)
    per_side = int(np.ceil(np.sqrt(count)))
    side = max(1, min(thumb_size, SPRITE_MAX_SIDE // per_side))
    images = images_at(data, list(range(count)), side, limit)
    if len(images) != count:
        raise DataError(f"{data.path} gave {len(images)} images for {count} feature rows: did it change?")
    sprite = np.zeros([per_side * side, per_side * side, 3], np.uint8)
    for index, image in images.items():
        row, column = divmod(index, per_side)
        sprite[row * side:(row + 1) * side, column * side:(column + 1) * side] = image
    classes = data.classes or []
    names = [classes[l] if 0 <= l < len(classes) else ("" if l < 0 else str(l)) for l in found.labels]
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = f"block3 {found.meta.get('checkpoint', '')}".strip()
    embedding.tensor_path, embedding.metadata_path = PROJECTOR_FILES[0], PROJECTOR_FILES[1]
    embedding.tensor_shape.extend(found.features.shape)
    embedding.sprite.image_path = PROJECTOR_FILES[2]
    embedding.sprite.single_image_dim.extend([side, side])
    writers = {
        "features.tsv": lambda f: np.savetxt(f, found.features, fmt="%.6g", delimiter="\t"),
        # Two or more columns: the projector takes the first line as the header.
        "metadata.tsv": lambda f: _write_text(f, "index\tlabel\tclass\n" + "".join(
            f"{i}\t{int(l)}\t{_tsv_cell(n)}\n" for i, (l, n) in enumerate(zip(found.labels, names)))),
        "sprite.png": lambda f: _write_bytes(f, cv2.imencode(".png", sprite[:, :, ::-1])[1].tobytes()),
        "projector_config.pbtxt": lambda f: _write_text(f, text_format.MessageToString(config)),
    }
    return _write_files(logdir, writers, "the projector files")


def _tsv_cell(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


def _write_text(path: str, text: str) -> None:
    _write_bytes(path, text.encode())


def _write_bytes(path: str, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


def _write_records(path: str, features: np.ndarray, labels: np.ndarray) -> None:
    with tf.io.TFRecordWriter(path) as writer:
        for row, label in zip(features, labels):
            feature = {
                FEATURES_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                TFRECORD_LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def define_extraction_flags() -> None:
    """The trunk and extraction flags every eval program shares (call once per program)."""
    flags.DEFINE_enum("trunk_size", None, list(trunk.TRUNK_SIZES), "Trunk; default: the one the checkpoint "
                      "holds (for `random`: that of the other checkpoints, else 101).")
    flags.DEFINE_enum("output_stride", None, ["8", "16", "32"], "Atrous block3 stride (default 32).")
    flags.DEFINE_string("grid", "3", "Average block3 over a GxG grid of cells (3, as the paper) or `global`.")
    flags.DEFINE_integer("image_size", None, "Images are resized and centre-cropped to this square (default "
                         "224 for the 101 trunk, 96 for tiny); 28x28 idx images are upscaled bilinearly.")
    flags.DEFINE_integer("batch_size", 64, "Images per trunk call.")
    flags.DEFINE_integer("limit", None, "Use the first N examples of each data set.")
    flags.DEFINE_integer("seed", 0, "Seed of `random` trunk weights (and of the probe's validation split).")
    flags.DEFINE_string("cache_dir", default_cache_dir(), "Feature cache directory; '' disables the cache.")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtss_train", "features")


def settings_from_flags() -> Settings:
    """Settings from the flags of `define_extraction_flags`.

    Raises:
      MtssError: if --grid, --image_size, --batch_size or --limit is not valid.
    """
    values = flags.FLAGS
    grid = values.grid.strip().lower()
    if grid != "global" and not (grid.isdigit() and 1 <= int(grid) <= 32):
        raise MtssError(f"--grid must be a number of cells per side (1-32) or 'global', got {values.grid!r}")
    for name in ("image_size", "batch_size", "limit"):
        if values[name].value is not None and values[name].value < 1:
            raise MtssError(f"--{name} must be positive, got {values[name].value}")
    return Settings(trunk_size=values.trunk_size, grid=None if grid == "global" else int(grid),
                    output_stride=int(values.output_stride) if values.output_stride else None,
                    image_size=values.image_size, batch_size=values.batch_size, seed=values.seed)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise MtssError(f"unexpected arguments {' '.join(argv[1:])}; the data set is --data")
    values = flags.FLAGS
    settings = settings_from_flags()
    model = Trunk(values.checkpoint, settings)
    if not values.out and not values.projector:
        raise MtssError("nothing to write: pass --out DIR (features files), --projector LOGDIR, or both")
    if values.projector and values.sprite_size < 1:
        raise MtssError(f"--sprite_size must be positive, got {values.sprite_size}")
    data = open_labelled(values.data)
    found = load_or_extract(model, data, settings, values.limit, values.cache_dir or None, values.data)
    written = export(found, values.out, values.format) if values.out else []
    if values.projector:
        written += write_projector(found, data, values.projector, values.sprite_size, values.limit)
        print(f"tensorboard --logdir {values.projector}  (Projector tab)", file=sys.stderr)
    for path in written:
        print(path)
    print(f"{len(found.labels):,} examples x {found.features.shape[1]:,} features "
          f"(shape {found.meta['feature_shape']}), {found.meta['skipped']} undecodable images skipped",
          file=sys.stderr)


if __name__ == "__main__":
    define_extraction_flags()
    flags.DEFINE_string("checkpoint", None, "Checkpoint (prefix, file or train dir) or `random`.", required=True)
    flags.DEFINE_string("data", None, "Labelled data: class folders, TFRecords or idx files.", required=True)
    flags.DEFINE_string("out", None, "Output directory of the features files (--format).")
    flags.DEFINE_string("projector", None, "Also write features, labels and a sprite of the images for "
                        "TensorBoard's embedding projector into this directory (tensorboard --logdir it).")
    flags.DEFINE_integer("sprite_size", 48, "With --projector: side of each image in the sprite, at most.")
    flags.DEFINE_enum("format", "npy", list(FORMATS), "npy: features.npy + labels.npy; tfrecord: Examples.")
    app.run(cli_main(main))
