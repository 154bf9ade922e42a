"""The input pipelines' parts in TensorFlow ops: one pipeline for every strategy.

The photo and mask sources read, check and decode with these ops, in this process or, under
`--strategy parameter_server`, on each worker, which builds the pipeline the coordinator
traced (a `tf.numpy_function` per element would make the coordinator's Python decode every
worker's images).

Order: each epoch is a new permutation of all inputs (image files, frame/mask pairs, or
TFRecord files), drawn by `tf.random.experimental.index_shuffle` from the epoch number and
a seed that may be a tensor (each parameter-server worker draws its own): a full shuffle of
any number of inputs with no buffer. Records inside TFRecord files are only mixed locally
(4 files interleaved, blocks of SHUFFLE_BLOCK permuted), so write them shuffled, as
tensorflow/models slim's converters do.

Bad inputs are skipped, not fatal. `decoded` examines inputs in a parallel map whose errors
(a missing file, a corrupt image) are dropped by `ignore_errors`; the inputs go through it
in numbered chunks, so a dropped one is a gap in the numbers, and it is then diagnosed a
step at a time (`attempt`: which read or decode raised), slowly, as only bad inputs are.
Each skipped input goes to `report_skip`, a `tf.numpy_function` in a branch taken only for
a skipped input: the pipeline runs Python for bad inputs only. On a parameter-server worker
that call runs in the coordinator, the process that traced it (TensorFlow calls a Python
function back in the process that registered it), so the coordinator counts and names the
workers' skips too.
"""

from typing import Callable

import numpy as np

from mtss_train import compat
from mtss_train.compat import tf
from mtss_train.data.image_headers import PNG_SIGNATURE

# Ops that call back into Python (tf.numpy_function, tf.py_function, tf.compat.v1.py_func).
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
# Name of the Python calls `report_skip` makes: run for skipped inputs only, they leave a
# pipeline fit for remote workers (see `calls_python`).
SKIP_REPORT = "report_skip"
UNREADABLE = "could not be read"
UNDECODABLE = "not a decodable image"
# Inputs numbered together in `decoded`: a dropped one is diagnosed from its chunk.
CHUNK = 16
# Records of TFRecord files mixed together (`permuted_blocks`): about what one file of a
# sharded dataset holds (tensorflow/models slim writes ImageNet as 1,024 train files of ~1,250).
SHUFFLE_BLOCK = 1_000
# Bytes a TFRecord adds around each record: length (8), its CRC (4), the data's CRC (4).
_RECORD_OVERHEAD = 16
# (key, reason, evidence) of a skipped input, as bytes; evidence is what the reason is about
# (a path, the encoded bytes, or b''), for the source to say more than TF ops can. Plain
# Python: TF ops run inside it hang a parameter-server coordinator.
Report = Callable[[bytes, bytes, bytes], None]


def empty_image(channels: int = 3) -> tf.Tensor:
    """What a skipped input decodes to (a function: a tensor made at import would start
    TensorFlow's runtime before a multi-worker strategy can configure it)."""
    return tf.zeros([0, 0, channels], tf.uint8)


def calls_python(dataset: tf.data.Dataset) -> bool:
    """Whether building `dataset`'s elements runs Python (and so cannot run on a remote
    worker); `report_skip`'s calls, made only for bad inputs, do not count."""
    graph = compat.dataset_graph_def(dataset)
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    return any(node.op in PYTHON_OPS and not node.name.rsplit("/", 1)[-1].startswith(SKIP_REPORT) for node in nodes)


def report_skip(report: Report, key: tf.Tensor, reason: tf.Tensor, evidence: tf.Tensor) -> tf.Tensor:
    """An op that calls `report(key, reason, evidence)` in Python and gives True; for a
    branch taken only for a skipped input."""

    def call(*arguments: bytes) -> np.ndarray:
        report(*arguments)
        return np.array(True)

    return tf.numpy_function(call, [key, reason, evidence], tf.bool, stateful=True, name=SKIP_REPORT)


def _nothing(spec: tf.TensorSpec) -> tf.Tensor:
    """A tensor that fits `spec`, with 0 for each unknown dimension ('' for strings)."""
    return tf.zeros([0 if size is None else size for size in spec.shape], spec.dtype)


def attempt(fn: Callable[..., tf.Tensor], *args: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(fn(*args), True), or (a value of its type, False) if it raised. A dataset per call:
    for the rare path (diagnosing an input already known to be bad)."""
    tried = tf.data.Dataset.from_tensors(args).map(lambda *a: (fn(*a), True)).ignore_errors()
    failed = tf.data.Dataset.from_tensors((tf.nest.map_structure(_nothing, tried.element_spec[0]), False))
    return tried.concatenate(failed).take(1).get_single_element()


def endless_permutations(values: tuple[list, ...], seed: int | tf.Tensor,
                         epoch: Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset] | None = None
                         ) -> tf.data.Dataset:
    """Endless tuples of `values`' items (equal-length lists; one list gives its items
    alone), every epoch in a new order drawn from `seed` and the epoch number; `epoch`
    (an epoch's dataset, its number) -> what the epoch yields instead (see `endless_records`)."""
    count = len(values[0])
    columns = tuple(tf.constant(column) for column in values)
    seed = tf.cast(seed, tf.int64)

    def permuted(number: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.index_shuffle(tf.range(count, dtype=tf.int64), tf.stack([seed, number]), count - 1)
        shuffled = tuple(tf.gather(column, order) for column in columns)
        items = tf.data.Dataset.from_tensor_slices(shuffled if len(shuffled) > 1 else shuffled[0])
        return items if epoch is None else epoch(items, number)

    return tf.data.Dataset.counter().flat_map(permuted)


def endless_records(paths: list[str], sizes: list[int], seed: int | tf.Tensor, report: Report) -> tf.data.Dataset:
    """Endless ('file (record index)', record) of TFRecord files (`sizes`: their sizes in
    bytes), every epoch the files in a new order drawn from `seed` and the epoch number,
    their records mixed as `numbered_records` does."""
    seed = tf.cast(seed, tf.int64)
    return endless_permutations((paths, sizes), seed,
                                lambda files, epoch: numbered_records(files, report, tf.stack([seed, epoch])))


def numbered_records(files: tf.data.Dataset, report: Report, seed: tf.Tensor | None = None) -> tf.data.Dataset:
    """('file (record index)', record) of a dataset of (TFRecord path, its size in bytes).

    With a `seed` ([2] int64, e.g. a seed and an epoch number): records of 4 neighbouring
    files interleaved, then each block of SHUFFLE_BLOCK records permuted (`permuted_blocks`). Without: one file
    after the other, in order. A file whose records end before its size (truncated, corrupt
    or unreadable) is reported once it has given the records before the damage, each time it
    is read.
    """

    def numbered(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
        size = tf.cast(size, tf.int64)
        # A file that does not open is not read at all: `ignore_errors` would retry the
        # open forever. A damaged record ends the file (its end marker then reports it).
        opens = attempt(lambda p: tf.data.FixedLengthRecordDataset(p, 1, buffer_size=1).take(1).get_single_element(),
                        path)[1]
        records = tf.data.TFRecordDataset(path).take(tf.where(opens, tf.constant(-1, tf.int64), 0)).ignore_errors()
        marked = records.map(lambda record: (record, False)).concatenate(
            tf.data.Dataset.from_tensors((tf.constant(b""), True)))  # The file's end.

        def count(state: tuple[tf.Tensor, tf.Tensor], element: tuple[tf.Tensor, tf.Tensor]):
            index, consumed = state
            record, is_end = element
            reported = tf.cond(tf.logical_and(is_end, consumed < size),
                               lambda: report_skip(report, path, *_unread_rest(path, opens, index, consumed, size)),
                               lambda: tf.constant(True))
            with tf.control_dependencies([reported]):
                key = tf.strings.join([path, " (record ", tf.strings.as_string(index), ")"])
            consumed += tf.cast(tf.strings.length(record), tf.int64) + _RECORD_OVERHEAD
            return (index + 1, consumed), (key, record, is_end)

        start = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
        return marked.scan(start, count).filter(lambda key, record, is_end: tf.logical_not(is_end))

    if seed is None:
        records = files.flat_map(numbered)
    else:
        records = permuted_blocks(files.interleave(numbered, cycle_length=4, block_length=1), seed)
    return records.map(lambda key, record, is_end: (key, record))


def permuted_blocks(elements: tf.data.Dataset, seed: tf.Tensor, block: int = SHUFFLE_BLOCK) -> tf.data.Dataset:
    """`elements` (tuples of tensors) in blocks of `block`, each block in a random order drawn
    from `seed` ([2] int64) and the block's number.

    Not `Dataset.shuffle`: its seed goes through TensorFlow's global-seed logic, which cannot
    take a tensor once `tf.random.set_seed(0)` has run (it compares the seed with 0 in
    Python), and here the seed is a tensor (an epoch's, or a parameter-server worker's).
    """

    def permuted(number: tf.Tensor, columns: tuple[tf.Tensor, ...]) -> tf.data.Dataset:
        count = tf.shape(columns[0], out_type=tf.int64)[0]
        block_seed = tf.random.experimental.stateless_fold_in(seed, number)
        order = tf.random.experimental.index_shuffle(tf.range(count), block_seed, count - 1)
        # Indexed one at a time: a gathered copy would hold every block twice.
        return tf.data.Dataset.from_tensor_slices(order).map(lambda i: tuple(column[i] for column in columns))

    # The next block is read while this one is consumed, so no step waits for a whole block.
    return elements.batch(block).prefetch(1).enumerate().flat_map(permuted)


def _unread_rest(path: tf.Tensor, opens: tf.Tensor, records: tf.Tensor, consumed: tf.Tensor, size: tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """(reason, evidence) of a TFRecord file read to byte `consumed` of its `size`: its path
    lets the source say why one that does not open does not (see `Report`)."""
    damaged = tf.strings.join([
        "truncated or corrupt TFRecord file (read ", tf.strings.as_string(records), " records, ",
        tf.strings.as_string(consumed), " of its ", tf.strings.as_string(size), " bytes; the rest is lost)"])
    return tf.where(opens, damaged, UNREADABLE), path


def decoded(inputs: tf.data.Dataset, examine: Callable[..., tuple], diagnose: Callable[..., tuple],
            empty: Callable[[], tf.Tensor], report: Report, chunk: int = CHUNK) -> tf.data.Dataset:
    """The usable values that `examine` makes of `inputs`, in their order; each other input
    goes to `report` (through `report_skip`) every time it is met.

    Args:
      inputs: elements of string tensors (one, or a tuple) that locate an input (a path, a
        record).
      examine: element -> (key, value, reason): reason '' if the value is usable, else why
        not (too small, ...). It may raise (unreadable, undecodable): that element is then
        diagnosed.
      diagnose: element -> (key, reason, evidence) of an element whose examination raised,
        in ops that do not raise (see `attempt`).
      empty: the value of a skipped input (e.g. `empty_image`), for each chunk's end.
      report: see `Report`; runs in the process that built the pipeline.
      chunk: inputs numbered together; 1 examines them one at a time, without reading ahead.
    """

    def numbered(*columns: tf.Tensor) -> tf.data.Dataset:
        # Every element carries its chunk, so a gap can be diagnosed; number `count` is the
        # chunk's end, which finds a gap at the end of the chunk.
        count = tf.shape(columns[0], out_type=tf.int64)[0]
        return tf.data.Dataset.range(count + 1).map(lambda number: (number, columns))

    def examined(number: tf.Tensor, columns: tuple[tf.Tensor, ...]) -> tuple:
        within = number < tf.shape(columns[0], out_type=tf.int64)[0]
        key, value, reason = tf.cond(within, lambda: examine(*(column[number] for column in columns)),
                                     lambda: (tf.constant(""), empty(), tf.constant("")))
        return number, columns, key, value, reason

    def check(expected: tf.Tensor, element: tuple) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        number, columns, key, value, reason = element

        def report_gap() -> tf.Tensor:
            def one(missing: tf.Tensor) -> tf.Tensor:
                return tf.cast(report_skip(report, *diagnose(*(column[missing] for column in columns))), tf.int64)

            return tf.data.Dataset.range(expected, number).map(one).reduce(tf.constant(0, tf.int64), tf.add)

        within = number < tf.shape(columns[0], out_type=tf.int64)[0]
        skipped = tf.logical_and(within, tf.strings.length(reason) > 0)
        gap = tf.cond(number > expected, report_gap, lambda: tf.constant(0, tf.int64))
        named = tf.cond(skipped, lambda: report_skip(report, key, reason, tf.constant(b"")), lambda: tf.constant(True))
        with tf.control_dependencies([gap, named]):
            usable = tf.logical_and(within, tf.logical_not(skipped))
        return tf.where(within, number + 1, tf.zeros_like(number)), (usable, value)

    parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True} if chunk > 1 else {}
    tried = inputs.batch(chunk).flat_map(numbered).map(examined, **parallel)
    checked = tried.ignore_errors().scan(tf.constant(0, tf.int64), check)
    return checked.filter(lambda usable, _: usable).map(lambda _, value: value)


def header_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) int64 from a PNG's IHDR or a JPEG's start of frame; (-1, -1) for
    other formats. Raises for a JPEG whose header is corrupt."""
    head = tf.strings.substr(encoded, 0, 24) + b"\0" * 24  # Shorter files: zeros, no match.
    is_png = tf.logical_and(tf.strings.substr(head, 0, 8) == PNG_SIGNATURE, tf.strings.substr(head, 12, 4) == "IHDR")

    def png() -> tf.Tensor:
        width_height = tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.int32, little_endian=False)
        return tf.cast(tf.reverse(width_height, [0]), tf.int64)

    def jpeg() -> tf.Tensor:
        return tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)

    size = tf.case([(is_png, png), (tf.io.is_jpeg(encoded), jpeg)], default=lambda: tf.constant([-1, -1], tf.int64))
    return size[0], size[1]


def size_problem(height: tf.Tensor, width: tf.Tensor, min_side: int, max_pixels: int) -> tf.Tensor:
    """Why an image of this size is skipped ('' if it is not)."""
    height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    pixels = height * width

    def size() -> tf.Tensor:
        return tf.strings.as_string(width) + "x" + tf.strings.as_string(height)

    def too_many() -> tf.Tensor:
        millions = tf.strings.as_string(tf.cast(pixels, tf.float64) / 1e6, precision=1)
        return tf.strings.join(["too many pixels (", size(), " = ", millions,
                                f"M, over the limit of {max_pixels / 1e6:g}M, --max_image_pixels)"])

    def too_small() -> tf.Tensor:
        return tf.strings.join(["too small (", size(), f" px, both sides must be >= {min_side})"])

    return tf.case([(pixels > max_pixels, too_many), (tf.minimum(height, width) < min_side, too_small)],
                   default=lambda: tf.constant(""))


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 [H, W, channels] of a JPEG, PNG, GIF (first frame) or BMP; raises if it is none.

    JPEG's DCT is the accurate integer one, as OpenCV and PIL decode it; EXIF orientation is
    ignored, as in tensorflow/models slim.
    """
    return tf.cond(tf.io.is_jpeg(encoded),
                   lambda: tf.io.decode_jpeg(encoded, channels=channels, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(encoded, channels=channels, expand_animations=False))


def decode_rgb(encoded: tf.Tensor, min_side: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(RGB uint8 [H, W, 3], '') or (an empty image, why it is skipped: empty, too small, too
    many pixels); raises for bytes that do not decode. The size is checked from the header,
    so an image over the pixel limit is never decoded."""
    height, width = header_size(encoded)
    before = tf.case([(tf.strings.length(encoded) == 0, lambda: tf.constant("empty")),
                      (height >= 0, lambda: size_problem(height, width, min_side, max_pixels))],
                     default=lambda: tf.constant(""))

    def decoded_image() -> tuple[tf.Tensor, tf.Tensor]:
        image = decode(encoded, 3)
        # Checked again for formats whose header is not read.
        problem = size_problem(tf.shape(image)[0], tf.shape(image)[1], min_side, max_pixels)
        return tf.cond(tf.strings.length(problem) > 0, lambda: empty_image(), lambda: image), problem

    return tf.cond(tf.strings.length(before) > 0, lambda: (empty_image(), before), decoded_image)
