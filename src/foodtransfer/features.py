"""The features stage: run the frozen backbone once over train, validation and test.

Batches stream from the image store through tf.data into a compiled forward pass and straight
to a .npy file on disk, so memory does not depend on the number of images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from foodtransfer.atomic import atomic_dir
from foodtransfer.datasets import Split, image_dataset
from foodtransfer.images import NpyWriter
from foodtransfer.progress import progress

EXTRACT_BATCH = 32  # fixed so that sweeping batch_size does not re-extract features


@dataclass
class FeatureResult:
    images: int
    seconds: float
    dim: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def compile_forward(extractor, batch_size: int = EXTRACT_BATCH):
    """The forward pass of ``extractor`` (any Keras model of float images 0..255) as one
    compiled function of a fixed input: a batch of exactly ``batch_size`` uint8 images, cast
    to float on the device. Traced once (XLA where Keras would use it, i.e. on GPU)."""
    import tensorflow as tf

    height, width, channels = extractor.input_shape[1:]
    spec = tf.TensorSpec((batch_size, height, width, channels), tf.uint8)

    @tf.function(input_signature=[spec], jit_compile=bool(extractor.jit_compile))
    def forward(images):
        return extractor(tf.cast(images, tf.float32), training=False)

    forward.batch_size = batch_size
    forward.output_shape = tuple(extractor.output_shape[1:])
    return forward


def write_outputs(forward, trimmed_dir: Path, split: Split, path: Path,
                  on_batch=lambda count: None) -> None:
    """Stream the images of ``split`` (manifest order) through ``forward`` (from
    :func:`compile_forward`) into ``path``, a float32 .npy of one output row per image; memory
    does not grow with the number of images. ``on_batch(count)`` follows the progress."""
    dataset = image_dataset(trimmed_dir, split, forward.batch_size, with_labels=False,
                            fixed_batches=True)
    with NpyWriter(path, forward.output_shape, "float32") as writer:
        for images, count in dataset:
            count = int(count)
            writer.extend(forward(images).numpy()[:count].astype("float32", copy=False))
            on_batch(count)


def extract_features(extractor, trimmed_dir: Path, splits: dict[str, Split], out_dir: Path,
                     *, metadata: dict, batch_size: int = EXTRACT_BATCH, forward=None,
                     show_progress: bool = True) -> FeatureResult:
    """Write ``<split>.npy`` (float32, one row per image in manifest order) and ``meta.json``
    (what the features are, deterministic: no timings) under ``out_dir``, atomically.

    ``forward``: a function from :func:`compile_forward`, to reuse its trace across calls."""
    dim = int(extractor.output_shape[-1])
    if forward is None:
        forward = compile_forward(extractor, batch_size)
    started = time.perf_counter()
    total = 0
    with atomic_dir(out_dir) as tmp:
        for name, split in splits.items():
            with progress(total=len(split), desc=f"features {name}", unit=" img",
                          enabled=show_progress) as bar:
                write_outputs(forward, trimmed_dir, split, tmp / f"{name}.npy", bar.update)
            total += len(split)
        (tmp / "meta.json").write_text(json.dumps(
            {**metadata, "dim": dim, "images": total}, indent=2) + "\n")
    return FeatureResult(total, time.perf_counter() - started, dim)
