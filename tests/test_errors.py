"""How users' errors read: one line, whatever TensorFlow or Keras did to them on the way."""

import pytest
import tf_keras

from mtss_train.errors import DataError, message


class Refusing(tf_keras.layers.Layer):
    def call(self, inputs):
        raise DataError("images/ holds no photos")


def test_an_error_raised_in_a_keras_layer_keeps_its_own_one_line_message():
    with pytest.raises(DataError) as caught:
        Refusing()(tf_keras.Input([2]))
    assert "\n" in str(caught.value)  # Keras added the layer and its call arguments.
    assert message(caught.value) == "images/ holds no photos"


def test_an_error_that_adds_to_another_keeps_what_it_adds():
    try:
        try:
            raise DataError("no usable image")
        except DataError as e:
            raise DataError(f"photos/: {e} (3 undecodable image(s) skipped)") from None
    except DataError as e:
        assert message(e) == "photos/: no usable image (3 undecodable image(s) skipped)"


def test_an_error_raised_directly_is_its_message():
    try:
        try:
            raise KeyError("unrelated")
        except KeyError:
            raise DataError("no frames/ directory") from None
    except DataError as e:
        assert message(e) == "no frames/ directory"
