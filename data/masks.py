"""Frames and their motion masks, as the motion-mask extractor writes them, read by tf.data.

The extractor (`python -m mtss_train.data.motion_masks`) writes a directory

    DIR/manifest.json                       settings and per-video statistics
    DIR/frames/<video_id>/<frame:06d>.jpg   RGB frames
    DIR/masks/<video_id>/<frame:06d>.png    uint8 single channel, 0 background, 255 foreground

A frame pairs with the mask of the same video id and frame name. TFRecords of
`tf.train.Example`s with the keys 'image/encoded' and 'mask/encoded' work too.

As in `mtss_train.data.images`, decoding runs OpenCV inside `tf.numpy_function`, so a
corrupt or vanished file is skipped and counted (once, by path) instead of ending the
endless pipeline; a frame without its mask (or a mask without its frame) is counted too.
`dataset(..., pure_tf=True)` decodes with TF ops only, for parameter-server workers.
"""

import hashlib
import os
from typing import Sequence

import cv2
import numpy as np

from mtss_train.compat import tf
from mtss_train.data.files import is_tfrecord, walk_files
from mtss_train.data import in_graph
from mtss_train.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_rgb, read_file
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


def decode_mask(encoded: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
    """Encoded mask -> uint8 [H, W, 1] of 0 / 255, or None if unreadable or not `shape[:2]`."""
    try:
        mask = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        return None
    if mask is None or mask.shape != tuple(shape[:2]):
        return None
    # Binarised at half range, so a resaved or rescaled mask still means 0 / 255.
    return np.where(mask >= 128, 255, 0).astype(np.uint8)[..., None]


def decode_pair(frame_bytes: bytes, mask_bytes: bytes, min_side: int) -> tuple[np.ndarray | None, str]:
    """(RGB uint8 [H, W, 4] = frame channels + mask channel, '') or (None, which part was bad)."""
    frame = decode_rgb(frame_bytes, min_side)
    if frame is None:
        return None, "frame"
    mask = decode_mask(mask_bytes, frame.shape)
    if mask is None:
        return None, "mask"
    return np.concatenate([frame, mask], axis=-1), ""


class MaskSource:
    """Endless shuffled {'frame': uint8 [H, W, 3], 'mask': uint8 [H, W, 1]} examples.

    Args:
      kind: 'files' (a frames/ + masks/ directory) or 'tfrecords'.
      items: (frame path, mask path) pairs, or TFRecord file paths.
      where: what messages name (the path the user gave).
      min_side: frames with a smaller side are skipped and counted.
      unpaired: frames or masks without a partner; counted as skipped.
    """

    def __init__(self, kind: str, items: list, where: str, min_side: int = 16, unpaired: Sequence[str] = ()):
        self.kind, self.items, self.path = kind, items, where
        self.min_side = min_side
        self.skipped = SkipCounter()
        for path in unpaired:
            self.skipped.add(path)
        self._check_some_pair_decodes()

    def _check_some_pair_decodes(self) -> None:
        # Fails fast instead of letting an all-bad source stall the endless pipeline.
        for frame, mask in self._records().as_numpy_iterator():
            if self._read_pair(frame, mask)[0] is not None:
                return
        what = "frame/mask pairs" if self.kind == "files" else f"TFRecord file(s) ('{TFRECORD_FRAME_KEY}' + '{TFRECORD_MASK_KEY}')"
        raise DataError(
            f"none of the {len(self.items)} {what} in {self.path} decoded to a frame with both sides "
            f">= {self.min_side} px and a mask of the same size"
        )

    def _read_pair(self, frame: bytes, mask: bytes) -> tuple[np.ndarray | None, str]:
        """Decodes one pair (paths for 'files', encoded bytes for TFRecords); (None, key) if bad."""
        if self.kind == "files":
            pair, bad = decode_pair(read_file(frame), read_file(mask), self.min_side)
            return pair, (frame if bad == "frame" else mask).decode() if bad else ""
        pair, bad = decode_pair(frame, mask, self.min_side)
        return pair, hashlib.sha1(frame + mask).hexdigest() if bad else ""

    def _decode(self, frame: bytes, mask: bytes) -> np.ndarray:
        pair, key = self._read_pair(frame, mask)
        if pair is None:
            self.skipped.add(key)
            return np.zeros([0, 0, 4], np.uint8)
        return pair

    def _records(self, items: list | None = None) -> tf.data.Dataset:
        """(frame, mask) path pairs ('files') or encoded pairs read from `items`' TFRecords."""
        items = self.items if items is None else items
        if self.kind == "files":
            frames, masks = zip(*items)
            return tf.data.Dataset.from_tensor_slices((list(frames), list(masks)))
        feature = {key: tf.io.FixedLenFeature([], tf.string) for key in (TFRECORD_FRAME_KEY, TFRECORD_MASK_KEY)}

        def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            example = tf.io.parse_single_example(record, feature)
            return example[TFRECORD_FRAME_KEY], example[TFRECORD_MASK_KEY]

        # A truncated file or a record missing a key is dropped (with a logged warning), not
        # counted: tf.data cannot say which record failed.
        return tf.data.TFRecordDataset(items).map(parse).ignore_errors(log_warning=True)

    def dataset(self, seed: int | tf.Tensor, shard: tuple[int, int] = (1, 0), pure_tf: bool = False) -> tf.data.Dataset:
        """Endless dataset of {'frame', 'mask'}; `shard` = (num_shards, index) per input pipeline.

        Shards split the pairs (or TFRecord files) round-robin in sorted order, so every
        shard sees every video. With fewer items than shards, all read all in their own order.
        `pure_tf`: read and decode with TF ops only (see `mtss_train.data.in_graph`), for
        pipelines that run on remote workers; `seed` may then be a tensor, and bad pairs are
        named in the log where they are read.
        """
        num_shards, index = shard
        items = self.items
        if num_shards > 1:
            if len(items) >= num_shards:
                items = items[index::num_shards]
            else:
                seed += index
        # A full shuffle of the (small) paths: sorted pairs run video by video, and a
        # partial shuffle would fill batches with near-identical neighbouring frames.
        if pure_tf:
            return in_graph.drop_skipped(self._decoded_in_tf(self._records_in_tf(items, seed))).map(_split_pair)
        buffer = len(items) if self.kind == "files" else 1_000
        records = self._records(items).shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        pairs = records.map(
            lambda frame, mask: tf.ensure_shape(
                tf.numpy_function(self._decode, [frame, mask], tf.uint8, stateful=False), [None, None, 4]
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return pairs.filter(lambda pair: tf.size(pair) > 0).map(_split_pair)

    def _records_in_tf(self, items: list, seed: int | tf.Tensor) -> tf.data.Dataset:
        """Endless shuffled (key, frame path, mask path) with the frame's path as key
        ('files'), or ('file (record index)', record) of TFRecords; TF ops only."""
        if self.kind == "files":
            frames, masks = (list(column) for column in zip(*items))
            return in_graph.endless_permutations((frames, frames, masks), seed)
        return in_graph.numbered_records(in_graph.endless_permutations((list(items),), seed))

    def _decoded_in_tf(self, records: tf.data.Dataset) -> tf.data.Dataset:
        """(key, uint8 [H, W, 4] frame + mask, reason) of `_records_in_tf`, in TF ops only."""
        if self.kind == "files":
            records = in_graph.interleave_attempts(
                records,
                lambda key, frame, mask: (key, tf.io.read_file(frame), tf.io.read_file(mask), tf.constant("")),
                lambda key, frame, mask: (key, tf.constant(""), tf.constant(""),
                                          tf.constant(f"it or its mask {in_graph.UNREADABLE}")),
            )
        else:
            feature = {key: tf.io.FixedLenFeature([], tf.string) for key in (TFRECORD_FRAME_KEY, TFRECORD_MASK_KEY)}

            def parsed(key: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, ...]:
                example = tf.io.parse_single_example(record, feature)
                return key, example[TFRECORD_FRAME_KEY], example[TFRECORD_MASK_KEY], tf.constant("")

            records = in_graph.interleave_attempts(records, parsed, lambda key, record: (
                key, tf.constant(""), tf.constant(""),
                tf.constant(f"not a tf.train.Example with '{TFRECORD_FRAME_KEY}' and '{TFRECORD_MASK_KEY}' features")))
        min_side = self.min_side
        return in_graph.interleave_attempts(
            records,
            lambda key, frame, mask, reason: (key, *_decode_pair_in_tf(frame, mask, reason, min_side)),
            lambda key, frame, mask, reason: (key, in_graph.empty_image(4),
                                              tf.constant(f"it or its mask is {in_graph.UNDECODABLE}")),
        )


def _decode_pair_in_tf(frame: tf.Tensor, mask: tf.Tensor, reason: tf.Tensor, min_side: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`decode_pair` in TF ops: (uint8 [H, W, 4], '') or (an empty pair, why)."""
    image, reason = in_graph.decode_rgb(frame, reason, min_side, DEFAULT_MAX_PIXELS)

    def with_mask() -> tuple[tf.Tensor, tf.Tensor]:
        decoded = tf.io.decode_png(mask, channels=1)
        fits = tf.reduce_all(tf.shape(decoded)[:2] == tf.shape(image)[:2])
        # Binarised at half range, so a resaved or rescaled mask still means 0 / 255.
        binary = tf.where(decoded >= 128, tf.constant(255, tf.uint8), tf.constant(0, tf.uint8))
        return tf.cond(fits, lambda: (tf.concat([image, binary], -1), tf.constant("")),
                       lambda: (in_graph.empty_image(4), tf.constant("its mask is not the frame's size")))

    return tf.cond(tf.strings.length(reason) > 0, lambda: (in_graph.empty_image(4), reason), with_mask)


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
