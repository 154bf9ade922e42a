"""Frames and their motion masks, as the motion-mask extractor writes them, read by tf.data.

The extractor (`python -m mtss_train.data.motion_masks`) writes a directory

    DIR/manifest.json                       settings and per-video statistics
    DIR/frames/<video_id>/<frame:06d>.jpg   RGB frames
    DIR/masks/<video_id>/<frame:06d>.png    uint8 single channel, 0 background, 255 foreground

A frame pairs with the mask of the same video id and frame name. TFRecords of
`tf.train.Example`s with the keys 'image/encoded' and 'mask/encoded' work too.

As photos are (`mtss_train.data.images`), pairs are read and decoded with TF ops in every
strategy (see `mtss_train.data.in_graph`): a corrupt or vanished file is skipped and counted
once, by the path of the frame or mask that is bad (a record by its file and number),
instead of ending the endless pipeline; a frame without its mask (or a mask without its
frame) is counted too.
"""

import os
from typing import Sequence

from mtss_train.compat import tf
from mtss_train.data import in_graph
from mtss_train.data.files import is_tfrecord, walk_files
from mtss_train.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, explain, file_sizes
from mtss_train.data.source import SkipCounter
from mtss_train.errors import DataError

FRAMES_DIR, MASKS_DIR = "frames", "masks"
MASK_EXTENSIONS = (".png",)  # Masks must be lossless: JPEG would smear the 0/255 edges.
TFRECORD_FRAME_KEY, TFRECORD_MASK_KEY = "image/encoded", "mask/encoded"
LAYOUT_HINT = (
    "expected the extractor's output (python -m mtss_train.data.motion_masks): "
    "frames/<video>/<frame>.jpg and masks/<video>/<frame>.png, or TFRecords with "
    f"'{TFRECORD_FRAME_KEY}' and '{TFRECORD_MASK_KEY}'"
)
_NOT_A_PAIR = f"not a tf.train.Example with '{TFRECORD_FRAME_KEY}' and '{TFRECORD_MASK_KEY}' features"


def _images_by_key(root: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """{'<video_id>/<frame name without extension>': path} of the images under `root`."""
    return {
        os.path.splitext(os.path.relpath(path, root))[0]: path
        for path in walk_files(root)
        if path.lower().endswith(extensions)
    }


def find_pairs(path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(sorted (frame path, mask path) pairs, paths of frames or masks that lack a partner).

    Raises:
      DataError: if `path`, its frames/ or masks/ directory is missing, or nothing pairs.
    """
    if not os.path.isdir(path):
        raise DataError(f"motion-mask data {path} does not exist or is not a directory")
    roots = {kind: os.path.join(path, kind) for kind in (FRAMES_DIR, MASKS_DIR)}
    for kind, root in roots.items():
        if not os.path.isdir(root):
            raise DataError(f"{path} has no {kind}/ directory; {LAYOUT_HINT}")
    frames = _images_by_key(roots[FRAMES_DIR], IMAGE_EXTENSIONS)
    masks = _images_by_key(roots[MASKS_DIR], MASK_EXTENSIONS)
    pairs = [(frames[key], masks[key]) for key in sorted(frames.keys() & masks.keys())]
    unpaired = sorted([frames[k] for k in frames.keys() - masks.keys()] + [masks[k] for k in masks.keys() - frames.keys()])
    if not pairs:
        raise DataError(
            f"no frame in {roots[FRAMES_DIR]} has a mask in {roots[MASKS_DIR]} "
            f"({len(frames)} frame(s), {len(masks)} mask(s)); {LAYOUT_HINT}"
        )
    return pairs, unpaired


def find_records(path: str) -> list[str]:
    """The TFRecord files under `path` (a file or directory), sorted; [] if none."""
    if os.path.isfile(path):
        return [path]
    return sorted(p for p in walk_files(path) if is_tfrecord(p))


class MaskSource:
    """Endless shuffled {'frame': uint8 [H, W, 3], 'mask': uint8 [H, W, 1]} examples.

    Args:
      kind: 'files' (a frames/ + masks/ directory) or 'tfrecords'.
      items: (frame path, mask path) pairs, or TFRecord file paths.
      where: what messages name (the path the user gave).
      min_side: frames with a smaller side are skipped and counted.
      unpaired: frames or masks without a partner; counted as skipped.

    Raises:
      DataError: if no pair decodes.
    """

    builds_remotely = True

    def __init__(self, kind: str, items: list, where: str, min_side: int = 16, unpaired: Sequence[str] = ()):
        self.kind, self.items, self.path = kind, items, where
        self.min_side = min_side
        self.skipped = SkipCounter()
        self._sizes = file_sizes(items) if kind == "tfrecords" else []
        for path in unpaired:
            self.skipped.add(path)
        self._check_some_pair_decodes()

    def _check_some_pair_decodes(self) -> None:
        # Fails fast instead of letting an all-bad source stall the endless pipeline: the
        # pipeline's own decoding over the pairs in order, one at a time, until one is usable.
        def ignore(key: bytes, reason: bytes, evidence: bytes) -> None:
            """The pipeline names the bad pairs when it meets them."""

        if self.kind == "files":
            inputs = tf.data.Dataset.from_tensor_slices(tuple(list(column) for column in zip(*self.items)))
        else:
            inputs = in_graph.numbered_records(tf.data.Dataset.from_tensor_slices((self.items, self._sizes)), ignore)
        for _ in self._pairs(inputs, ignore, chunk=1).take(1):
            return
        what = "frame/mask pairs" if self.kind == "files" else f"TFRecord file(s) ('{TFRECORD_FRAME_KEY}' + '{TFRECORD_MASK_KEY}')"
        raise DataError(
            f"none of the {len(self.items)} {what} in {self.path} decoded to a frame with both sides "
            f">= {self.min_side} px and a mask of the same size"
        )

    def dataset(self, seed: int | tf.Tensor, shard: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
        """Endless dataset of {'frame', 'mask'}; `shard` = (num_shards, index) per input pipeline.

        Shards split the pairs (or TFRecord files) round-robin in sorted order, so every
        shard sees every video. With fewer items than shards, all read all in their own
        order. Every epoch is a new order of all pairs: sorted pairs run video by video, and
        a partial shuffle would fill batches with near-identical neighbouring frames. (The
        records of TFRecord files are mixed only locally, see `in_graph`: write them
        shuffled.) `seed` may be a scalar int64 tensor.
        """
        num_shards, index = shard
        items, sizes = self.items, self._sizes
        if num_shards > 1:
            if len(items) >= num_shards:
                items, sizes = items[index::num_shards], sizes[index::num_shards]
            else:
                seed += index
        report = self.skipped.reporter(explain)
        if self.kind == "files":
            inputs = in_graph.endless_permutations(tuple(list(column) for column in zip(*items)), seed)
        else:
            inputs = in_graph.endless_records(items, sizes, seed, report)
        return self._pairs(inputs, report).map(_split_pair)

    def _pairs(self, inputs: tf.data.Dataset, report: in_graph.Report, chunk: int = in_graph.CHUNK) -> tf.data.Dataset:
        """uint8 [H, W, 4] frame + mask of `inputs` ((frame, mask) paths, or (key, record))."""
        if self.kind == "files":
            examine, diagnose = self._examine_files, self._diagnose_files
        else:
            examine, diagnose = self._examine_record, self._diagnose_record
        return in_graph.decoded(inputs, examine, diagnose, lambda: in_graph.empty_image(4), report, chunk)

    def _decode_pair(self, frame: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(uint8 [H, W, 4], '', '') or (an empty pair, 'frame' or 'mask', why that one is
        skipped); raises if the frame or the mask does not decode."""
        image, reason = in_graph.decode_rgb(frame, self.min_side, DEFAULT_MAX_PIXELS)

        def with_mask() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            decoded = in_graph.decode(mask, 1)
            frame_size, mask_size = tf.shape(image)[:2], tf.shape(decoded)[:2]
            # Binarised at half range, so a resaved or rescaled mask still means 0 / 255.
            binary = tf.where(decoded >= 128, tf.constant(255, tf.uint8), tf.constant(0, tf.uint8))
            misfit = tf.strings.join(["not its frame's size (", _size_text(mask_size), " px, the frame is ",
                                      _size_text(frame_size), ")"])
            return tf.cond(tf.reduce_all(frame_size == mask_size),
                           lambda: (tf.concat([image, binary], -1), tf.constant(""), tf.constant("")),
                           lambda: (in_graph.empty_image(4), tf.constant("mask"), misfit))

        return tf.cond(tf.strings.length(reason) > 0,
                       lambda: (in_graph.empty_image(4), tf.constant("frame"), reason), with_mask)

    def _examine_files(self, frame: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pair, part, reason = self._decode_pair(tf.io.read_file(frame), tf.io.read_file(mask))
        return tf.where(part == "mask", mask, frame), pair, reason

    def _frame_decodes(self, frame: tf.Tensor) -> tf.Tensor:
        """Whether the frame's bytes decode (from its header only if it is too large)."""
        return in_graph.attempt(lambda encoded: in_graph.decode_rgb(encoded, self.min_side, DEFAULT_MAX_PIXELS)[1],
                                frame)[1]

    def _diagnose_files(self, frame: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        frame_bytes, frame_read = in_graph.attempt(tf.io.read_file, frame)
        mask_bytes, mask_read = in_graph.attempt(tf.io.read_file, mask)
        unreadable, undecodable = tf.constant(in_graph.UNREADABLE), tf.constant(in_graph.UNDECODABLE)
        return tf.case([(tf.logical_not(frame_read), lambda: (frame, unreadable, frame)),
                        (tf.logical_not(self._frame_decodes(frame_bytes)), lambda: (frame, undecodable, frame_bytes)),
                        (tf.logical_not(mask_read), lambda: (mask, unreadable, mask))],
                       default=lambda: (mask, undecodable, mask_bytes))

    def _parsed(self, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(encoded frame, encoded mask) of a record; raises if it is no Example with both."""
        feature = {key: tf.io.FixedLenFeature([], tf.string) for key in (TFRECORD_FRAME_KEY, TFRECORD_MASK_KEY)}
        example = tf.io.parse_single_example(record, feature)
        return example[TFRECORD_FRAME_KEY], example[TFRECORD_MASK_KEY]

    def _examine_record(self, key: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pair, part, reason = self._decode_pair(*self._parsed(record))
        return key, pair, tf.where(tf.strings.length(reason) > 0, part + ": " + reason, reason)

    def _diagnose_record(self, key: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        (frame, _), parsed = in_graph.attempt(self._parsed, record)
        part = tf.where(self._frame_decodes(frame), "mask", "frame")
        return key, tf.where(parsed, part + ": " + in_graph.UNDECODABLE, _NOT_A_PAIR), tf.constant(b"")


def _size_text(height_width: tf.Tensor) -> tf.Tensor:
    """'WxH' of a [height, width] tensor."""
    return tf.strings.as_string(height_width[1]) + "x" + tf.strings.as_string(height_width[0])


def _split_pair(pair: tf.Tensor) -> dict[str, tf.Tensor]:
    """uint8 [H, W, 4] -> {'frame': [H, W, 3], 'mask': [H, W, 1]}."""
    pair = tf.ensure_shape(pair, [None, None, 4])
    return {"frame": pair[..., :3], "mask": pair[..., 3:]}


def mask_source(path: str | None, min_side: int = 16) -> MaskSource:
    """Frames + masks under `path`; None: the embedded sample clip's (extracted on first use).

    Raises:
      DataError: naming `path` if it is missing, holds no pairs, or none of them decodes.
    """
    if path is None:
        from mtss_train.data.clip import sample_clip_masks  # Lazy: extracts on first use.

        directory = sample_clip_masks()
        pairs, unpaired = find_pairs(directory)
        return MaskSource("files", pairs, f"the embedded sample clip's masks ({directory})", min_side, unpaired)
    if not os.path.exists(path):
        raise DataError(f"motion-mask data {path} does not exist")
    records = [] if os.path.isdir(os.path.join(path, FRAMES_DIR)) else find_records(path)
    if records:
        return MaskSource("tfrecords", records, path, min_side)
    pairs, unpaired = find_pairs(path)
    return MaskSource("files", pairs, path, min_side, unpaired)
