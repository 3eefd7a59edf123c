"""Logging a trained image classifier to MLflow as a pyfunc model, and that pyfunc itself.

The pyfunc takes encoded photos (a column ``image`` of file bytes: JPEG, PNG, WebP..., MLflow's
``binary`` type, base64 text in JSON), decoded and resized inside the model exactly as the trim
stage does; or raw RGB images as they come from a decoder, ``uint8`` or float (any numeric
dtype), shape ``(n, image_size, image_size, 3)`` or one image ``(image_size, image_size, 3)``,
pixels in 0..255 (the backbone's preprocessing is inside the Keras model), and returns a
DataFrame of class probabilities, one column per class name, rows summing to 1. Its signature
therefore declares the outputs only (MLflow would refuse a ``uint8`` batch against a float32
input schema); the input's size is in the model's metadata (``image_size``), and the pyfunc
checks every input itself: a bad one is an MLflow "invalid parameter" error (HTTP 400 from
``mlflow models serve``) that says what it expected.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

# Images per traced forward pass of the served model: each runs the whole backbone, so memory,
# not call overhead, sets the size (rows of cached features take FEATURE_BATCH in hyperrule).
IMAGE_BATCH = 32
MODEL_NAME = "model"  # the logged model's name in its run: runs:/<run_id>/model
KERAS_ARTIFACT, NAMES_ARTIFACT = "keras_model", "class_names"  # the pyfunc's artifacts


ENCODED_COLUMN = "image"  # the column of encoded images (MLflow type binary)


def _encoded_values(model_input: Any) -> list | None:
    """The encoded images in ``model_input`` (bytes, base64 text, or TF Serving's
    ``{"b64": text}``), one per row, or None when it holds decoded pixels.

    Accepted: a DataFrame with an ``image`` column or a single column (``dataframe_split``,
    ``dataframe_records``), a dict with an ``image`` entry (``{"inputs": {"image": [...]}}``,
    ``{"instances": [{"image": ...}]}``, ``{"instances": [{"b64": ...}]}``) and a 1-D list or array of them (``{"inputs":
    [...]}``)."""
    if isinstance(model_input, pd.DataFrame):
        if ENCODED_COLUMN in model_input.columns:
            values = model_input[ENCODED_COLUMN]
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0]
        else:
            return None
        values = list(values)
    elif isinstance(model_input, dict):
        key = next((k for k in (ENCODED_COLUMN, "b64") if k in model_input), None)
        if key is None or len(model_input) != 1:
            return None
        values = list(np.asarray(model_input[key], dtype=object).reshape(-1))
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        array = np.asarray(model_input, dtype=object) if not isinstance(
            model_input, np.ndarray) else model_input
        if array.ndim != 1 or array.dtype.kind not in "OSU":
            return None
        values = list(array)
    else:
        return None
    # MLflow parses {"instances": [{"image": {"b64": ...}}]} into 0-d object arrays.
    values = [v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for v in values]
    if not values or not all(isinstance(v, (bytes, str, dict)) for v in values):
        return None
    return values


def _encoded_bytes(value: Any, row: int) -> bytes:
    from mlflow.exceptions import MlflowException

    if isinstance(value, dict):
        value = value.get("b64")
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise MlflowException.invalid_parameter_value(
            f"row {row}: the image is neither bytes nor base64 text "
            f"(starts {str(value)[:20]!r}); send each photo's file bytes base64-encoded, "
            f"e.g. base64.b64encode(open('photo.jpg', 'rb').read()).decode()") from None


# Photos decoded at once in a process: the scoring server runs requests in threads, and each
# decode may hold up to ~240 MB (images.MAX_PIXELS), so concurrent requests queue here.
DECODING_SLOTS = 2
_decoding = threading.BoundedSemaphore(DECODING_SLOTS)


def decode_encoded(values: list, side: int) -> np.ndarray:
    """Encoded photos (JPEG, PNG, WebP, anything PIL reads) decoded and resized exactly as the
    trim stage and ``foodtransfer predict`` do; a bad one is an invalid-input error naming its
    row."""
    from mlflow.exceptions import MlflowException

    from foodtransfer.data.images import decode_image

    images = np.empty((len(values), side, side, 3), np.uint8)
    for row, value in enumerate(values):
        with _decoding:  # concurrent requests decode at most that many at once
            decoded = decode_image(_encoded_bytes(value, row), side)
        if decoded.pixels is None:
            raise MlflowException.invalid_parameter_value(
                f"row {row}: cannot decode the image: {decoded.reason}")
        images[row] = decoded.pixels
    return images


def as_image_batch(model_input: Any, side: int) -> np.ndarray:
    """``model_input`` (encoded photos, or decoded pixels) as a float32 batch
    ``(n, side, side, 3)``, or an MLflow invalid-input error that says what was expected and
    what came."""
    from mlflow.exceptions import MlflowException

    encoded = _encoded_values(model_input)
    if encoded is not None:
        return decode_encoded(encoded, side).astype("float32")
    expected = (f"encoded photos (a column '{ENCODED_COLUMN}' of bytes or base64 text), or "
                f"pixels (n, {side}, {side}, 3) or one image ({side}, {side}, 3), RGB 0..255")
    try:
        images = np.asarray(model_input)
        if images.dtype.kind not in "uif":  # not numbers: strings, objects, ragged lists
            raise ValueError(f"values of type {images.dtype}")
        images = images.astype("float32")
    except (TypeError, ValueError) as error:
        raise MlflowException.invalid_parameter_value(
            f"expected {expected}, got {error}") from None
    if images.ndim == 3:
        images = images[None]
    if images.shape[1:] != (side, side, 3) or not len(images):
        raise MlflowException.invalid_parameter_value(
            f"expected {expected}, got an array of shape {images.shape}")
    if not np.isfinite(images).all():
        raise MlflowException.invalid_parameter_value("the images hold NaN or infinite values")
    return images


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import keras

        import foodtransfer.models.classifiers  # noqa: F401  (registers the model's layers)

        import tensorflow as tf

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        with open(context.artifacts[NAMES_ARTIFACT]) as handle:
            self.class_names = json.load(handle)
        # One traced forward pass for any batch size, traced here rather than on the first
        # request: Keras' predict() builds a tf.data pipeline per call (hundreds of ms) and an
        # eager call runs layer by layer; the graph answers one image in a few tens of ms.
        side = int(self.model.input_shape[1])
        self._forward = tf.function(
            lambda images: self.model(images, training=False),
            input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32)])
        self._forward(tf.zeros([1, side, side, 3]))

    # model_input has no type hint on purpose: MLflow would try to turn it into a signature.
    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = as_image_batch(model_input, int(self.model.input_shape[1]))
        chunks = [np.asarray(self._forward(images[start:start + IMAGE_BATCH]))
                  for start in range(0, len(images), IMAGE_BATCH)]
        probabilities = (np.concatenate(chunks) if chunks else
                         np.zeros((0, len(self.class_names)), np.float32))
        return pd.DataFrame(probabilities, columns=self.class_names)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide MLflow's advice that does not apply here (type hints for predict, cloudpickle of a
    class that holds no state); its errors still show."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def pip_requirements() -> list[str]:
    """The logged model's requirements, pinned to what is installed. Given explicitly, so that
    MLflow does not infer them by loading the model in a subprocess (tens of seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for distribution in ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "numpy", "pandas",
                         "pillow"):
        try:
            pinned.append(f"{distribution}=={version(distribution)}")
        except PackageNotFoundError:
            continue
    return pinned


def log_model(model_path: Path, class_names_path: Path, example: Any) -> str:
    """Log the saved Keras model to the active run as a pyfunc (raw RGB 0..255 in, a DataFrame
    of class probabilities out) with its signature and an input example; returns its URI."""
    from mlflow.models import ModelSignature, infer_signature

    import foodtransfer
    from foodtransfer.tracking.store import retry_on_lock

    # The output schema is known without running the model: one float32 column per class. No
    # input schema: the images may be uint8 or float (see the module's docstring).
    class_names = json.loads(Path(class_names_path).read_text())
    output = pd.DataFrame(np.full((len(example), len(class_names)), 1 / len(class_names),
                                  dtype="float32"), columns=class_names)
    signature = ModelSignature(inputs=None, outputs=infer_signature(example, output).outputs)
    side = int(example.shape[1])
    with _quiet_mlflow():
        info = retry_on_lock(mlflow.pyfunc.log_model)(
            name=MODEL_NAME, python_model=ImageClassifierModel(),  # unloaded: pickles small
            artifacts={KERAS_ARTIFACT: str(model_path), NAMES_ARTIFACT: str(class_names_path)},
            code_paths=[str(Path(foodtransfer.__file__).parent)],
            pip_requirements=pip_requirements(),
            signature=signature, input_example=np.clip(example, 0, 255).astype("uint8"),
            metadata={"image_size": side, "classes": len(class_names),
                      "input": f"encoded photos (column '{ENCODED_COLUMN}': bytes, base64 "
                               f"in JSON), or RGB images, uint8 or float, pixels 0..255: "
                               f"(n, {side}, {side}, 3) or ({side}, {side}, 3)"},
        )
    return info.model_uri
