"""Stage ``features``: run the frozen backbone once over train, validation and test, and cache
the pooled features, so that the heads train in seconds.

Batches stream from the image store through tf.data into a compiled forward pass and straight
to a .npy file on disk, so memory does not depend on the number of images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from foodtransfer.atomic import atomic_dir, write_text
from foodtransfer.config import Params
from foodtransfer.data.manifests import Split, data_version, load_splits
from foodtransfer.models.inference import compile_forward, write_outputs
from foodtransfer.progress import progress


@dataclass
class FeatureResult:
    images: int
    seconds: float
    dim: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def extract_features(extractor, trimmed_dir: Path, splits: dict[str, Split], out_dir: Path,
                     *, metadata: dict, forward=None,
                     show_progress: bool = True) -> FeatureResult:
    """Write ``<split>.npy`` (float32, one row per image in manifest order) and ``meta.json``
    (what the features are, deterministic: no timings) under ``out_dir``, atomically.

    ``forward``: a function from :func:`compile_forward`, to reuse its trace across calls."""
    dim = int(extractor.output_shape[-1])
    if forward is None:
        forward = compile_forward(extractor)
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


def run(params: Params, trimmed: Path, split: Path, out: Path, metrics: Path) -> str:
    import keras

    from foodtransfer.models.classifiers import build_feature_extractor

    # The backbone's initial weights when weights=none: part of the data, like the split, so
    # that sweeping the training seed re-extracts nothing.
    keras.utils.set_random_seed(params.data.seed)
    splits = load_splits(split)
    extractor = build_feature_extractor(params.backbone, params.weights, params.image_size)
    result = extract_features(extractor, trimmed, splits, out, metadata={
        "backbone": params.backbone, "weights": params.weights, "image_size": params.image_size,
        "data_version": data_version(split)})
    # Timings go to a metrics file, not into the features folder: its hash stays the same
    # when the same features are extracted again, so downstream stages are not re-run.
    write_text(metrics, json.dumps({
        "images": result.images, "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2)}, indent=2) + "\n")
    return (f"{params.backbone} features ({result.dim}-d) of {result.images} images at "
            f"{result.images_per_second:.1f} images/s into {out}")
