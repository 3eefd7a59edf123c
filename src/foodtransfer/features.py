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


def extract_features(extractor, trimmed_dir: Path, splits: dict[str, Split], out_dir: Path,
                     *, metadata: dict, batch_size: int = EXTRACT_BATCH,
                     show_progress: bool = True) -> FeatureResult:
    import tensorflow as tf

    dim = int(extractor.output_shape[-1])
    forward = tf.function(lambda images: extractor(images, training=False),
                          reduce_retracing=True)
    started = time.perf_counter()
    total = 0
    with atomic_dir(out_dir) as tmp:
        for name, split in splits.items():
            dataset = image_dataset(trimmed_dir, split, batch_size, with_labels=False)
            with NpyWriter(tmp / f"{name}.npy", (dim,), "float32") as writer, progress(
                    total=len(split), desc=f"features {name}", unit=" img",
                    enabled=show_progress) as bar:
                for images in dataset:
                    features = forward(images).numpy().astype("float32", copy=False)
                    writer.extend(features)
                    bar.update(len(features))
            total += len(split)
        seconds = time.perf_counter() - started
        result = FeatureResult(total, seconds, dim)
        (tmp / "meta.json").write_text(json.dumps(
            {**metadata, "dim": dim, "images": total, "seconds": round(seconds, 3),
             "images_per_second": round(result.images_per_second, 2)}, indent=2) + "\n")
    return result
