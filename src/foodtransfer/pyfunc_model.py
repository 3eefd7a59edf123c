"""The MLflow pyfunc wrapper of a trained image classifier.

Input: raw RGB images as a float32 (or uint8) array ``(n, image_size, image_size, 3)`` with
pixels in 0..255; the backbone's preprocessing is inside the Keras model. Output: a DataFrame of
class probabilities, one column per class name, rows summing to 1.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pandas as pd

DIRECT_CALL_MAX = 8


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
