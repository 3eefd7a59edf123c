"""The ImageNet backbones we compare, each with the preprocessing Keras expects for it.

Every backbone model built here takes raw RGB pixels in 0..255 (float or uint8): the exact
preprocessing is a layer inside the model, so the cached features, the fine-tuned model and the
model logged to MLflow all see images the same way.

- EfficientNet (V1 and V2) and ConvNeXt carry their preprocessing inside the Keras model
  (``include_preprocessing=True``, the default): 0..255 in.
- MobileNetV2 expects [-1, 1]: ``Rescaling(1/127.5, offset=-1)``.
- ResNet50 and VGG16 expect "caffe" inputs: BGR order, ImageNet channel means subtracted.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from foodtransfer import config
from foodtransfer.errors import UserError


CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)


def caffe_preprocess_layer() -> keras.layers.Layer:
    """RGB 0..255 -> BGR minus the ImageNet means (``imagenet_utils`` "caffe" mode) as a fixed
    1x1 convolution: a built-in layer, so saved models load without custom code."""
    permutation = [[[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]]  # out[c] = in[2-c]
    return keras.layers.Conv2D(
        3, 1, name="preprocess", trainable=False,
        kernel_initializer=keras.initializers.Constant(permutation),
        bias_initializer=keras.initializers.Constant([-m for m in CAFFE_MEANS_BGR]),
    )


def preprocess_layer(name: str) -> keras.layers.Layer | None:
    """The layer that scales raw RGB 0..255 the way backbone ``name`` expects (None: the
    backbone does it itself)."""
    check_backbone(name)
    kind = config.BACKBONES[name]
    if kind == "mobilenet":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")
    if kind == "caffe":
        return caffe_preprocess_layer()
    return None


def check_backbone(name: str) -> None:
    if name not in config.BACKBONES:
        raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(config.BACKBONES)}")


def _keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_backbone(name: str, weights: str, image_size: int) -> keras.Model:
    """The backbone without its top, inputs ``(image_size, image_size, 3)`` in its own scale.

    ``weights``: ``imagenet`` (Keras downloads and caches it in ~/.keras/models), ``none`` or
    a path to a weights file.
    """
    check_backbone(name)
    keras_weights: str | None = None if weights == "none" else weights
    if keras_weights not in (None, "imagenet") and not Path(keras_weights).is_file():
        raise UserError(f"weights = {weights!r}: no such file. Set weights to an existing file, "
                        "'imagenet' or 'none'.")
    try:
        # EfficientNetV2 and ConvNeXt scale their inputs themselves (include_preprocessing
        # defaults to True): 0..255 in.
        return getattr(keras.applications, name)(include_top=False, weights=keras_weights,
                                                 input_shape=(image_size, image_size, 3))
    except Exception as error:  # Keras raises bare Exceptions for fetch failures
        if keras_weights == "imagenet":
            raise UserError(
                f"could not get the ImageNet weights of {name} ({type(error).__name__}: "
                f"{error}). Keras downloads them once into {_keras_cache_dir()}; offline, put "
                "the file named in that message there, or set weights to the path of a "
                "weights file (or 'none' for random weights)."
            ) from error
        if keras_weights is not None:
            raise UserError(
                f"could not load weights file {keras_weights!r} into {name} ({error}). Is it a "
                f"{name} weights file without the top (include_top=False)?"
            ) from error
        raise

