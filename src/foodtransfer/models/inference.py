"""Running a model over data without training it: compiled forward passes over a split's
images (streamed to disk or collected), and batched predictions of in-memory arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foodtransfer.data.datasets import Transform, image_dataset
from foodtransfer.data.images import NpyWriter
from foodtransfer.data.manifests import Split
from foodtransfer.training.hyperrule import FEATURE_BATCH, FORWARD_BATCH


def compile_forward(model, batch_size: int = FORWARD_BATCH, input_dtype: str = "uint8"):
    """The forward pass of ``model`` as one compiled function of a fixed input: a batch of
    exactly ``batch_size`` inputs, cast to float on the device. Inputs are uint8 images for a
    model of float images 0..255, or float32 (``input_dtype``) for a cut through a network
    (the frozen bottom's output in). Traced once (XLA where Keras would use it, i.e. on GPU)."""
    import tensorflow as tf

    spec = tf.TensorSpec((batch_size, *model.input_shape[1:]), tf.as_dtype(input_dtype))

    @tf.function(input_signature=[spec], jit_compile=bool(model.jit_compile))
    def forward(inputs):
        return model(tf.cast(inputs, tf.float32), training=False)

    forward.batch_size = batch_size
    forward.input_size = int(model.input_shape[1])
    forward.output_shape = tuple(model.output_shape[1:])
    return forward


def forward_batches(forward, trimmed_dir: Path, split: Split,
                    transform: Transform | None = None):
    """Yield ``forward``'s outputs (NumPy, float32) for the images of ``split`` in manifest
    order, one batch at a time, without the zero padding of the last batch. ``transform``
    (a crop, augmented views) maps each uint8 batch to ``forward``'s input size first."""
    dataset = image_dataset(trimmed_dir, split, forward.batch_size, with_labels=False,
                            fixed_batches=True, transform=transform,
                            size=forward.input_size if transform else None)
    for images, count in dataset:
        yield forward(images).numpy()[:int(count)].astype("float32", copy=False)


def write_outputs(forward, trimmed_dir: Path, split: Split, path: Path,
                  on_batch=lambda count: None, transform: Transform | None = None,
                  append: NpyWriter | None = None) -> None:
    """Stream ``forward``'s outputs for the images of ``split`` (after ``transform``) into
    ``path``, a float32 .npy of one row per image, or onto the open writer ``append``; memory
    does not grow with the number of images. ``on_batch(count)`` follows the progress."""
    if append is not None:
        for outputs in forward_batches(forward, trimmed_dir, split, transform):
            append.extend(outputs)
            on_batch(len(outputs))
        return
    with NpyWriter(path, forward.output_shape, "float32") as writer:
        for outputs in forward_batches(forward, trimmed_dir, split, transform):
            writer.extend(outputs)
            on_batch(len(outputs))


def predict_split(forward, trimmed_dir: Path, split: Split) -> np.ndarray:
    """Class probabilities for every image of ``split`` (manifest order) from ``forward``, an
    image model's :func:`compile_forward`."""
    return np.concatenate(list(forward_batches(forward, trimmed_dir, split)))


def mirror_averaged(model, rows, mirrored=None) -> np.ndarray:
    """``model``'s probabilities for cached ``rows`` (features, frozen-bottom outputs), averaged
    with those for the rows of the mirror images where given (test-time augmentation)."""
    probabilities = predict_array(model, rows)
    if mirrored is None:
        return probabilities
    return (probabilities + predict_array(model, mirrored)) / 2


def predict_array(model, x, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """Probabilities for in-memory inputs, batch by batch, without Keras' data adapters."""
    import keras

    outputs = [keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=False))
               for start in range(0, len(x), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]))
