"""Reading and decoding in TensorFlow ops only, for input pipelines built on remote workers.

Under `--strategy parameter_server` every worker runs an input pipeline the coordinator
traced. A `tf.numpy_function` in it would call back into the coordinator's Python, which
would then decode every worker's images. So the sources offer a pure-TF pipeline too
(`dataset(..., pure_tf=True)`), built from these pieces.

Order: each epoch is a new permutation of all inputs, drawn by
`tf.random.experimental.index_shuffle` from the epoch number and a seed that may be a tensor
(each worker draws its own): a full shuffle of any number of inputs with no buffer.

Bad inputs are still skipped, not fatal: `attempt` turns each input into a one-element
dataset whose errors are dropped (`ignore_errors`) and falls back to a marked failure, so a
missing, corrupt or truncated file costs one element. `drop_skipped` names each skip in the
log of the process that met it (the worker), in the Python pipelines' words. What these
pipelines cannot do is count skips in the coordinator's progress line: the count lives
where the data is read.
"""

import sys
from typing import Callable

from mtss_train.compat import tf
from mtss_train.data.image_headers import PNG_SIGNATURE

# Ops that call back into Python (tf.numpy_function, tf.py_function, tf.compat.v1.py_func).
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
UNREADABLE = "could not be read"
UNDECODABLE = "not a decodable image"


def empty_image(channels: int = 3) -> tf.Tensor:
    """What a skipped input decodes to (a function: a tensor made at import would start
    TensorFlow's runtime before a multi-worker strategy can configure it)."""
    return tf.zeros([0, 0, channels], tf.uint8)


def calls_python(dataset: tf.data.Dataset) -> bool:
    """Whether building `dataset`'s elements runs Python (and so cannot run on a remote worker)."""
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())  # noqa: SLF001  No public way.
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    return any(node.op in PYTHON_OPS for node in nodes)


def endless_permutations(values: tuple[list, ...], seed: int | tf.Tensor) -> tf.data.Dataset:
    """Endless tuples of `values`' items (equal-length lists; one list gives its items
    alone), every epoch in a new order drawn from `seed` and the epoch number."""
    count = len(values[0])
    columns = tuple(tf.constant(column) for column in values)
    seed = tf.cast(seed, tf.int64)

    def epoch(number: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.index_shuffle(tf.range(count, dtype=tf.int64), tf.stack([seed, number]), count - 1)
        shuffled = tuple(tf.gather(column, order) for column in columns)
        return tf.data.Dataset.from_tensor_slices(shuffled if len(shuffled) > 1 else shuffled[0])

    return tf.data.Dataset.counter().flat_map(epoch)


def numbered_records(files: tf.data.Dataset) -> tf.data.Dataset:
    """('file (record index)', record) of a dataset of TFRecord paths: records of 4
    neighbouring files interleaved, then mixed in a 1,000-record buffer (seeded from the
    global seed, so alike on every worker; the file order is what differs)."""

    def numbered(path: tf.Tensor) -> tf.data.Dataset:
        # A truncated or corrupt file ends here; TF logs that it dropped the error.
        records = tf.data.TFRecordDataset(path).ignore_errors(log_warning=True).enumerate()
        return records.map(lambda i, record: (path + " (record " + tf.strings.as_string(i) + ")", record))

    return files.interleave(numbered, cycle_length=4, block_length=1).shuffle(1_000)


def attempt(fn: Callable[..., tuple], fallback: Callable[..., tuple]) -> Callable[..., tf.data.Dataset]:
    """For `Dataset.interleave`: element -> a dataset of one element, `fn(*element)`, or
    `fallback(*element)` if `fn` raised (an unreadable file, a corrupt image)."""

    def one_element(*element: tf.Tensor) -> tf.data.Dataset:
        tried = tf.data.Dataset.from_tensors(element).map(fn).ignore_errors()
        return tried.concatenate(tf.data.Dataset.from_tensors(fallback(*element))).take(1)

    return one_element


def interleave_attempts(dataset: tf.data.Dataset, fn: Callable[..., tuple], fallback: Callable[..., tuple]) -> tf.data.Dataset:
    """`attempt(fn, fallback)` on every element, in parallel, keeping the order."""
    return dataset.interleave(attempt(fn, fallback), cycle_length=tf.data.AUTOTUNE, block_length=1,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def read(key: tf.Tensor, path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(key, the file's bytes, '')."""
    return key, tf.io.read_file(path), tf.constant("")


def unread(key: tf.Tensor, path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`read`'s fallback: (key, '', why)."""
    return key, tf.constant(""), tf.constant(UNREADABLE)


def header_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) int64 from a PNG's IHDR or a JPEG's start of frame; (-1, -1) for
    other formats. Raises (inside `attempt`) for a JPEG whose header is corrupt."""
    head = tf.strings.substr(encoded + b"\0" * 24, 0, 24)  # substr fails past the end.
    is_png = tf.logical_and(tf.strings.substr(head, 0, 8) == PNG_SIGNATURE, tf.strings.substr(head, 12, 4) == "IHDR")

    def png() -> tf.Tensor:
        width_height = tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.int32, little_endian=False)
        return tf.cast(tf.reverse(width_height, [0]), tf.int64)

    def jpeg() -> tf.Tensor:
        return tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)

    size = tf.case([(is_png, png), (tf.io.is_jpeg(encoded), jpeg)], default=lambda: tf.constant([-1, -1], tf.int64))
    return size[0], size[1]


def size_problem(height: tf.Tensor, width: tf.Tensor, min_side: int, max_pixels: int) -> tf.Tensor:
    """Why an image of this size is skipped ('' if it is not), as the Python readers say it."""
    height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    pixels = height * width
    size = tf.strings.as_string(width) + "x" + tf.strings.as_string(height)
    too_many = tf.strings.join([
        "too many pixels (", size, " = ", tf.strings.as_string(tf.cast(pixels, tf.float64) / 1e6, precision=1),
        f"M, over the limit of {max_pixels / 1e6:g}M, --max_image_pixels)"])
    too_small = tf.strings.join(["too small (", size, f" px, both sides must be >= {min_side})"])
    return tf.case([(pixels > max_pixels, lambda: too_many), (tf.minimum(height, width) < min_side, lambda: too_small)],
                   default=lambda: tf.constant(""))


def decode_rgb(encoded: tf.Tensor, reason: tf.Tensor, min_side: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(RGB uint8 [H, W, 3], '') or (an empty image, why it is skipped). An input already
    marked bad (`reason` not '') passes through; the size is checked from the header, so an
    image over the pixel limit is never decoded."""
    height, width = header_size(encoded)
    known = height >= 0
    before = tf.case([(tf.strings.length(reason) > 0, lambda: reason),
                      (tf.strings.length(encoded) == 0, lambda: tf.constant("empty")),
                      (known, lambda: size_problem(height, width, min_side, max_pixels))],
                     default=lambda: tf.constant(""))

    def decoded() -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        problem = size_problem(tf.shape(image)[0], tf.shape(image)[1], min_side, max_pixels)
        return tf.cond(tf.strings.length(problem) > 0, lambda: empty_image(), lambda: image), problem

    return tf.cond(tf.strings.length(before) > 0, lambda: (empty_image(), before), decoded)


def drop_skipped(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """(key, value, reason) elements -> the values whose reason is ''; each other one is
    named in this process's log as 'skipping KEY: REASON'."""

    def keep(key: tf.Tensor, value: object, reason: tf.Tensor) -> tf.Tensor:
        usable = tf.strings.length(reason) == 0

        def warn() -> tf.Tensor:
            # To stderr: TF's C++ log, which absl's warning would go to, hides warnings here
            # (TF_CPP_MIN_LOG_LEVEL=2, see mtss_train.startup).
            line = tf.strings.join(["warning: skipping ", key, ": ", reason])
            with tf.control_dependencies([tf.print(line, output_stream=sys.stderr)]):
                return tf.constant(False)

        return tf.cond(usable, lambda: tf.constant(True), warn)

    return dataset.filter(keep).map(lambda key, value, reason: value)
