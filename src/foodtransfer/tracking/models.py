"""Logging a trained image classifier to MLflow as a pyfunc model, and that pyfunc itself.

The pyfunc takes raw RGB images as a float32 (or uint8) array ``(n, image_size, image_size, 3)``
with pixels in 0..255 (the backbone's preprocessing is inside the Keras model) and returns a
DataFrame of class probabilities, one column per class name, rows summing to 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

DIRECT_CALL_MAX = 8
MODEL_NAME = "model"  # the logged model's name in its run: runs:/<run_id>/model


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False)
        with open(context.artifacts["class_names"]) as handle:
            self.class_names = json.load(handle)

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = np.asarray(model_input, dtype="float32")
        if images.ndim == 3:
            images = images[None]
        expected = tuple(self.model.input_shape[1:])
        if images.shape[1:] != expected:
            raise ValueError(f"expected images of shape (n, {', '.join(map(str, expected))}) "
                             f"with RGB pixels in 0..255, got {images.shape}")
        if len(images) <= DIRECT_CALL_MAX:
            # A few images: a direct call skips building Keras' predict function (seconds).
            probabilities = np.asarray(self.model(images, training=False))
        else:
            probabilities = self.model.predict(images, verbose=0)
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
    from mlflow.models import infer_signature

    import foodtransfer
    from foodtransfer.tracking.store import retry_on_lock

    # The output schema is known without running the model: one float32 column per class.
    class_names = json.loads(Path(class_names_path).read_text())
    output = pd.DataFrame(np.full((len(example), len(class_names)), 1 / len(class_names),
                                  dtype="float32"), columns=class_names)
    signature = infer_signature(example, output)
    with _quiet_mlflow():
        info = retry_on_lock(mlflow.pyfunc.log_model)(
            name=MODEL_NAME, python_model=ImageClassifierModel(),  # unloaded: pickles small
            artifacts={"keras_model": str(model_path), "class_names": str(class_names_path)},
            code_paths=[str(Path(foodtransfer.__file__).parent)],
            pip_requirements=pip_requirements(),
            signature=signature, input_example=example,
        )
    return info.model_uri
