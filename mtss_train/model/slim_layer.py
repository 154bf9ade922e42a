"""Runs tf-slim graph-building code in TF2 (eager, tf.function, tf.distribute).

slim creates variables with `tf.compat.v1.get_variable` inside variable scopes. A tf-keras
Layer whose `call` is decorated with `track_tf1_style_variables` captures those variables
under their slim names (no Keras prefix), reuses them on every later call, tracks slim's
weight-decay losses in `layer.losses`, and runs BatchNorm moving-average updates inline,
so TF2 code needs no UPDATE_OPS handling.
"""

from typing import Any, Callable

from mtss_train.compat import autocast, tf, tf_keras, track_tf1_style_variables


def slim_name(variable: tf.Variable) -> str:
    """The slim / checkpoint name of a variable: its name without the ':0' suffix."""
    name = variable.name
    return name[: name.rindex(":")] if ":" in name else name


_LOW_PRECISION = (tf.float16, tf.bfloat16)


def _float32_storage(getter: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Variable getter: slim asks for variables in its inputs' dtype; under mixed precision
    that is float16/bfloat16, so create them in float32 (checkpoints and updates stay
    float32) and hand slim Keras' auto-cast wrapper, which reads as the layer's compute
    dtype inside its call."""
    requested = kwargs.get("dtype")
    if requested not in _LOW_PRECISION:
        return getter(*args, **kwargs)
    return autocast(getter(*args, **{**kwargs, "dtype": tf.float32}))


class SlimLayer(tf_keras.layers.Layer):
    """A Keras layer around a slim network function `net_fn(inputs, is_training, **kw)`.

    Call it as `layer(inputs, training=True/False, **kw)`. `training` must be a Python
    bool (None means False): slim builds a different graph for each value, and tf.function
    traces once per value. Variables exist after the first call.
    """

    def __init__(self, net_fn: Callable[..., Any], name: str = "mtss", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self._net_fn = net_fn

    @track_tf1_style_variables
    def call(self, inputs: Any, training: bool | None = None, **kwargs: Any) -> Any:
        if training is not None and not isinstance(training, bool):
            raise TypeError(f"training must be a Python bool, got {type(training)}")
        with tf.compat.v1.variable_scope(
            tf.compat.v1.get_variable_scope(), custom_getter=_float32_storage, auxiliary_name_scope=False
        ):
            return self._net_fn(inputs, is_training=bool(training), **kwargs)

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """All variables (trainable and BN moving statistics) keyed by slim name."""
        return {slim_name(v): v for v in self.variables}
