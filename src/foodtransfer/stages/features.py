"""Stage ``features``: run the frozen backbone once over train, validation and test, and cache
the pooled features, so that the heads train in seconds (params ``backbone``, ``weights``,
``image_size`` and section ``features``).

The backbone sees the centre ``features.crop`` share of each image. With ``features.views``,
the cache also holds that many seeded augmented views of each training image
(``train_views.npy``, view by view), so the heads train on augmented data at cache speed; with
``features.tta``, the mirror images of validation and test (``{val,test}_flip.npy``) for
flip-averaged predictions. Batches stream from the image store through tf.data into a compiled
forward pass and straight to .npy files on disk: memory does not depend on the number of
images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from foodtransfer.atomic import atomic_dir, write_text
from foodtransfer.config import Params
from foodtransfer.data.augment import crop_size, crop_transform, mirror_transform, view_transform
from foodtransfer.data.datasets import Transform
from foodtransfer.data.images import NpyWriter
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


@dataclass(frozen=True)
class FeatureFile:
    """One file of the cache: the features of ``split``'s images after ``transforms`` (one
    block of rows per transform, in order)."""

    name: str
    split: Split
    transforms: tuple[Transform | None, ...]


def feature_files(splits: dict[str, Split], image_size: int, size: int, *, views: int = 0,
                  tta: bool = False, seed: int = 0) -> list[FeatureFile]:
    """What the cache holds: ``<split>.npy`` (the centre crop, or the image itself when
    ``size`` is ``image_size``), ``train_views.npy`` and ``{val,test}_flip.npy`` as asked."""
    plain = crop_transform(size) if size != image_size else None
    files = [FeatureFile(name, split, (plain,)) for name, split in splits.items()]
    if views:
        files.append(FeatureFile("train_views", splits["train"],
                                 tuple(view_transform(size, seed, view)
                                       for view in range(1, views + 1))))
    if tta:
        files += [FeatureFile(f"{name}_flip", splits[name], (mirror_transform(size),))
                  for name in ("val", "test")]
    return files


def extract_features(extractor, trimmed_dir: Path, files: list[FeatureFile], out_dir: Path,
                     *, metadata: dict, forward=None,
                     show_progress: bool = True) -> FeatureResult:
    """Write ``<file>.npy`` (float32, one row per image and transform, in manifest order) for
    each of ``files``, and ``meta.json`` (what the features are, deterministic: no timings)
    under ``out_dir``, atomically.

    ``forward``: a function from :func:`compile_forward`, to reuse its trace across calls."""
    dim = int(extractor.output_shape[-1])
    if forward is None:
        forward = compile_forward(extractor)
    started = time.perf_counter()
    total = 0
    with atomic_dir(out_dir) as tmp:
        for entry in files:
            count = len(entry.split) * len(entry.transforms)
            with progress(total=count, desc=f"{entry.name} images", unit="images",
                          enabled=show_progress) as bar, \
                    NpyWriter(tmp / f"{entry.name}.npy", (dim,), "float32") as writer:
                for transform in entry.transforms:
                    write_outputs(forward, trimmed_dir, entry.split, writer.path, bar.update,
                                  transform=transform, append=writer)
            total += count
        (tmp / "meta.json").write_text(json.dumps(
            {**metadata, "dim": dim, "images": total,
             "files": {entry.name: len(entry.split) * len(entry.transforms)
                       for entry in files}}, indent=2) + "\n")
    return FeatureResult(total, time.perf_counter() - started, dim)


def run(params: Params, trimmed: Path, split: Path, out: Path, metrics: Path) -> str:
    import keras

    from foodtransfer.models.classifiers import build_feature_extractor
    from foodtransfer.training.distribute import configure_gpus

    configure_gpus()
    config = params.features
    size = crop_size(params.image_size, config.crop)
    # The backbone's initial weights when weights=none: part of the data, like the split, so
    # that sweeping the training seed re-extracts nothing.
    keras.utils.set_random_seed(params.data.seed)
    splits = load_splits(split)
    extractor = build_feature_extractor(params.backbone, params.weights, size)
    files = feature_files(splits, params.image_size, size, views=config.views, tta=config.tta,
                          seed=params.data.seed)
    result = extract_features(extractor, trimmed, files, out, metadata={
        "backbone": params.backbone, "weights": params.weights, "image_size": params.image_size,
        "backbone_input": size, "views": config.views, "tta": config.tta,
        "data_version": data_version(split)})
    # Timings go to a metrics file, not into the features folder: its hash stays the same
    # when the same features are extracted again, so downstream stages are not re-run.
    write_text(metrics, json.dumps({
        "images": result.images, "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2)}, indent=2) + "\n")
    return (f"{params.backbone} features ({result.dim}-d, {size} px) of {result.images} images "
            f"({config.views} augmented views per training image, mirror images "
            f"{'too' if config.tta else 'not'}) at {result.images_per_second:.1f} images/s into "
            f"{out}")
