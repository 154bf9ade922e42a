"""Pictures of evaluation results, for people to look at beside the JSON that has the numbers.

* `neighbours_figure`: the nearest-neighbour grid of `mtss_train.eval.neighbours`.
* `confusion_figure`, `per_class_figure`: the linear probe's (and `compare`'s) test errors.
* `reproduce_figure`: the reproduction's table, mean +- std per arm, random init as a line.

matplotlib draws them off-screen (its Agg canvas, no pyplot state, so no display and no
figure left open); it is imported on first use, which a program that draws nothing never pays.
"""

import dataclasses
import io
import os
import pathlib
import textwrap
from typing import Any, Sequence

import numpy as np

from mtss_train.data.files import write_atomically
from mtss_train.errors import MtssError

DPI = 100
MATCH, MISMATCH = (46, 160, 67), (211, 47, 47)  # Green, red: a neighbour's label is / is not the query's.
QUERY_FRAME, NEUTRAL_FRAME = (30, 110, 220), (200, 200, 200)  # Blue: visible on dark and light images.
FRAME, PAD, QUERY_GAP = 3, 3, 14  # Pixels: frame width, space between cells, after the query column.
FONT = 9


def _figure(width_px: float, height_px: float) -> Any:
    """A matplotlib Figure of that many pixels on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Here: programs that draw nothing skip its import.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Any, path: str) -> None:
    """Writes the figure as a PNG at `path`, atomically (a reader never sees half a file).

    Raises:
      MtssError: `path` cannot be written.
    """
    def write(temporary: str) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
        pathlib.Path(temporary).write_bytes(buffer.getvalue())

    try:
        write_atomically(path, write)
    except OSError as e:
        raise MtssError(f"cannot write picture {path}: {e.strerror or e}") from None


def to_rgb(figure: Any) -> np.ndarray:
    """The figure's pixels, uint8 [H, W, 3] (e.g. for a TensorBoard image summary)."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[:, :, :3].copy()


def _wrap(text: str, width_px: float, size: float = FONT + 1) -> list[str]:
    """`text` in lines that fit `width_px` at font `size` (points; ~0.6 em a character)."""
    return textwrap.wrap(text, max(30, int((width_px - 20) / (0.6 * size * DPI / 72))))


def short_name(checkpoint: str) -> str:
    """What a title calls a checkpoint: `random init`, or its last two path parts."""
    if checkpoint == "random":  # mtss_train.loader.RANDOM; not imported, to keep TensorFlow out.
        return "random init"
    parts = os.path.normpath(checkpoint).split(os.sep)
    return os.path.join(*parts[-2:])


# Nearest neighbours.

@dataclasses.dataclass
class NeighbourBlock:
    """One checkpoint's part of the picture: its title, and per query row the indices of
    its neighbours int [Q, K] and their cosine similarities float [Q, K]."""

    title: str
    neighbours: np.ndarray
    similarities: np.ndarray


def neighbours_mosaic(block: NeighbourBlock, queries: np.ndarray, labels: np.ndarray | None,
                      thumbs: dict[int, np.ndarray]) -> np.ndarray:
    """uint8 [H, W, 3]: a row per query, the query in a dark frame, a gap, then its K
    neighbours framed green (same label), red (another) or grey (no labels)."""
    size = next(iter(thumbs.values())).shape[0]
    cell = size + 2 * FRAME
    rows, k = block.neighbours.shape
    canvas = np.full([rows * cell + (rows - 1) * PAD, (k + 1) * cell + k * PAD + QUERY_GAP - PAD, 3], 255, np.uint8)

    def put(index: int, row: int, x: int, colour: tuple[int, int, int]) -> None:
        y = row * (cell + PAD)
        canvas[y:y + cell, x:x + cell] = colour
        canvas[y + FRAME:y + FRAME + size, x + FRAME:x + FRAME + size] = thumbs[int(index)]

    for row, query in enumerate(queries):
        put(query, row, 0, QUERY_FRAME)
        for column, found in enumerate(block.neighbours[row]):
            colour = NEUTRAL_FRAME if labels is None else MATCH if labels[found] == labels[query] else MISMATCH
            put(found, row, cell + QUERY_GAP + column * (cell + PAD), colour)
    return canvas


def neighbours_figure(blocks: Sequence[NeighbourBlock], queries: np.ndarray, labels: np.ndarray | None,
                      thumbs: dict[int, np.ndarray], row_names: Sequence[str], caption: str) -> Any:
    """The blocks side by side, each image at its own pixel size (no resampling), under a
    wrapped caption; rows named on the left, columns `query`, 1..K on top."""
    mosaics = [neighbours_mosaic(b, queries, labels, thumbs) for b in blocks]
    size = next(iter(thumbs.values())).shape[0]
    cell = size + 2 * FRAME
    left = 12 + 7 * max([len(n) for n in row_names] + [0])
    gap, right, bottom = 36, 12, 10
    width = left + sum(m.shape[1] for m in mosaics) + gap * (len(mosaics) - 1) + right
    lines = _wrap(caption, width, FONT)
    title_lines = max(b.title.count("\n") + 1 for b in blocks)
    top = 12 + 15 * len(lines) + 10 + 15 * title_lines + 8 + 20
    height = top + mosaics[0].shape[0] + bottom
    figure = _figure(width, height)
    figure.text(6 / width, 1 - 8 / height, "\n".join(lines), ha="left", va="top", fontsize=FONT)
    x = left
    k = blocks[0].neighbours.shape[1]
    centres = [cell / 2] + [cell + QUERY_GAP + c * (cell + PAD) + cell / 2 for c in range(k)]
    for index, (block, mosaic) in enumerate(zip(blocks, mosaics)):
        h, w = mosaic.shape[:2]
        axes = figure.add_axes([x / width, bottom / height, w / width, h / height])
        axes.imshow(mosaic, interpolation="nearest", extent=(0, w, h, 0))
        axes.set_title(block.title, fontsize=FONT + 1, pad=22)
        axes.xaxis.tick_top()
        axes.set_xticks(centres, ["query"] + [str(c + 1) for c in range(k)], fontsize=FONT - 1)
        rows = [r * (cell + PAD) + cell / 2 for r in range(len(queries))]
        axes.set_yticks(rows, list(row_names) if index == 0 else [""] * len(rows), fontsize=FONT - 1)
        axes.tick_params(length=0, pad=3)
        for spine in axes.spines.values():
            spine.set_visible(False)
        x += w + gap
    return figure


# The linear probe.

def confusion_figure(panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str], caption: str) -> Any:
    """One confusion matrix per (title, counts [K, K]; row: true class, column: predicted),
    coloured by the share of its row (recall), with the percentage in each cell."""
    classes = len(class_names)
    side = max(260, 34 * classes)
    label_room = 12 + 7 * max(len(n) for n in class_names)
    width = len(panels) * (side + label_room + 40) + 20
    height = side + label_room + 110
    figure = _figure(width, height)
    figure.suptitle("\n".join(_wrap(caption, width)), fontsize=FONT + 1, y=1 - 8 / height, va="top")
    for index, (title, counts) in enumerate(panels):
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        x0 = 20 + index * (side + label_room + 40) + label_room
        axes = figure.add_axes([x0 / width, (label_room + 20) / height, side / width, side / height])
        axes.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if classes <= 20:  # Beyond that the numbers would not fit their cells.
            for (row, column), value in np.ndenumerate(share):
                if counts[row].sum():
                    axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=FONT - 2,
                              color="white" if value > 0.6 else "black")
        ticks = np.arange(classes)
        axes.set_xticks(ticks, class_names, rotation=90, fontsize=FONT - 1)
        axes.set_yticks(ticks, class_names, fontsize=FONT - 1)
        axes.set_xlabel("predicted", fontsize=FONT)
        axes.set_ylabel("true class", fontsize=FONT)
        axes.set_title(title, fontsize=FONT)
    return figure


def per_class_figure(series: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str], caption: str) -> Any:
    """Test accuracy per class: a group of bars per class, one bar per (name, accuracies [K])."""
    classes = len(class_names)
    width = max(640, 80 + classes * (14 * len(series) + 16))
    lines = _wrap(caption, width)
    long_names = max(len(n) for n in class_names) > 4
    top, bottom = 14 + 15 * len(lines) + 18 * ((len(series) + 2) // 2) + 10, 30 + (6 * max(len(n) for n in class_names)
                                                                                     if long_names else 0)
    height = top + 260 + bottom
    figure = _figure(width, height)
    figure.text(0.5, 1 - 8 / height, "\n".join(lines), ha="center", va="top", fontsize=FONT + 1)
    axes = figure.add_axes([60 / width, bottom / height, 1 - 80 / width, 260 / height])
    bar = 0.8 / len(series)
    positions = np.arange(classes)
    for index, (name, accuracy) in enumerate(series):
        axes.bar(positions + (index - (len(series) - 1) / 2) * bar, accuracy, bar, label=name)
    axes.axhline(1 / classes, color="grey", linestyle=":", linewidth=1, label="chance")
    axes.set_xticks(positions, class_names, rotation=45 if long_names else 0, ha="right" if long_names else "center",
                    fontsize=FONT)
    axes.set_xlim(-0.6, classes - 0.4)
    axes.set_ylim(0, 1)
    axes.set_ylabel("test accuracy", fontsize=FONT)
    axes.tick_params(labelsize=FONT)
    axes.grid(axis="y", alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    order = [i for i, n in enumerate(names) if n != "chance"] + [names.index("chance")]  # Chance last.
    axes.legend([handles[i] for i in order], [names[i] for i in order], fontsize=FONT, loc="lower left",
                bbox_to_anchor=(0, 1.01), ncol=2, frameon=False, borderaxespad=0)
    return figure


def reproduce_figure(arms: Sequence[str], columns: Sequence[str], means: np.ndarray, stds: np.ndarray,
                     random_means: Sequence[float], caption: str) -> Any:
    """Bars of mean test top-1 [arms, columns] with +-std error bars, a bar group per arm;
    each column's random-init mean as a dashed horizontal line in its bar colour."""
    names = [arm.replace("@", "\n@") for arm in arms]  # Settings on lines of their own.
    group = max(70, 26 * len(columns) + 20, 7 * max(len(line) for n in names for line in n.split("\n")))
    width = max(560, 90 + group * len(arms))
    lines = _wrap(caption, width)
    top = 14 + 15 * len(lines) + 18 * len(columns) + 10
    bottom = 30 + 13 * max(n.count("\n") + 1 for n in names)
    height = top + 280 + bottom
    figure = _figure(width, height)
    figure.text(0.5, 1 - 8 / height, "\n".join(lines), ha="center", va="top", fontsize=FONT + 1)
    axes = figure.add_axes([70 / width, bottom / height, 1 - 90 / width, 280 / height])
    bar = 0.8 / len(columns)
    positions = np.arange(len(arms))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for index, column in enumerate(columns):
        colour = colours[index % len(colours)]
        axes.bar(positions + (index - (len(columns) - 1) / 2) * bar, means[:, index], bar, yerr=stds[:, index],
                 capsize=3, color=colour, label=column)
        axes.axhline(random_means[index], color=colour, linestyle="--", linewidth=1.2,
                     label=f"random init, {column}: {random_means[index]:.4f}")
    low = min(float(np.min(means - stds)), min(random_means))
    high = max(float(np.max(means + stds)), max(random_means))
    margin = max(0.005, 0.15 * (high - low))
    # Zoomed to the bars: the arms differ by a point or two, which a 0-1 axis would hide.
    axes.set_ylim(max(0.0, low - margin), min(1.0, high + margin))
    axes.set_xlim(-0.6, len(arms) - 0.4)
    axes.set_xticks(positions, names, fontsize=FONT - 1)
    axes.set_ylabel("test top-1, mean +- std", fontsize=FONT)
    axes.tick_params(axis="y", labelsize=FONT)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=FONT - 1, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=2, frameon=False, borderaxespad=0)
    return figure
