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

The same passes write the fine-tune's cache (``--bottom-out``, params ``finetune.unfreeze``,
``views``, ``cache_frozen``, ``augment``): the output of the backbone's frozen bottom (below the
layers the fine-tune unfreezes) for every image the fine-tune reads: the training images and
``finetune.views`` augmented views of each, validation and test (and their mirror images with
TTA). Each image goes through the bottom once; the features come from the bottom's output
through the rest of the backbone. An image only the fine-tune needs (a view beyond
``features.views``) goes through the bottom alone. The fine-tune then makes no backbone pass.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foodtransfer.atomic import atomic_dir, write_text
from foodtransfer.config import Params
from foodtransfer.data.augment import crop_size, crop_transform, mirror_transform, view_transform
from foodtransfer.data.datasets import Transform, image_dataset
from foodtransfer.data.images import NpyWriter
from foodtransfer.data.manifests import Split, data_version, load_splits
from foodtransfer.models.inference import compile_forward, forward_batches
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

    @property
    def rows(self) -> int:
        return len(self.split) * len(self.transforms)


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


def bottom_files(splits: dict[str, Split], image_size: int, size: int, *, views: int = 0,
                 tta: bool = False, seed: int = 0) -> list[FeatureFile]:
    """What the fine-tune's frozen-bottom cache holds: ``train.npy`` (the plain image, then
    each of ``views`` augmented views, view by view: what the fine-tune's epochs read),
    ``val.npy`` and ``test.npy``, and ``{val,test}_flip.npy`` with TTA (to evaluate)."""
    plain = crop_transform(size) if size != image_size else None
    files = [FeatureFile("train", splits["train"],
                         (plain, *(view_transform(size, seed, view)
                                   for view in range(1, views + 1)))),
             FeatureFile("val", splits["val"], (plain,)),
             FeatureFile("test", splits["test"], (plain,))]
    if tta:
        files += [FeatureFile(f"{name}_flip", splits[name], (mirror_transform(size),))
                  for name in ("val", "test")]
    return files


@dataclass
class BottomCache:
    """The fine-tune's frozen-bottom cache, written in the same backbone passes as the
    features: ``bottom`` (image -> frozen bottom) and ``top`` (its output -> pooled features)
    from :func:`foodtransfer.models.classifiers.frozen_bottom_cut`."""

    bottom: Any
    top: Any
    files: list[FeatureFile]
    out_dir: Path
    metadata: dict


Block = tuple[str, Any]  # (split name, transform): one backbone pass over a split's images


def _blocks(files: list[FeatureFile]) -> dict[Block, list[str]]:
    """Each distinct (split, transform) of ``files``, in order, with the files it feeds."""
    blocks: dict[Block, list[str]] = {}
    for entry in files:
        for transform in entry.transforms:
            blocks.setdefault((entry.split.name, transform), []).append(entry.name)
    return blocks


def extract_features(extractor, trimmed_dir: Path, files: list[FeatureFile], out_dir: Path,
                     *, metadata: dict, forward=None, show_progress: bool = True,
                     bottom: BottomCache | None = None) -> FeatureResult:
    """Write ``<file>.npy`` (float32, one row per image and transform, in manifest order) for
    each of ``files``, and ``meta.json`` (what the features are, deterministic: no timings)
    under ``out_dir``, atomically; with ``bottom``, the frozen bottom's output for each of its
    files too, under ``bottom.out_dir``, from the same passes: an image the features and the
    fine-tune both need goes through the backbone once.

    ``forward``: a function from :func:`compile_forward`, to reuse its trace across calls."""
    dim = int(extractor.output_shape[-1])
    feature_blocks = _blocks(files)
    bottom_blocks = _blocks(bottom.files) if bottom else {}
    order = list(dict.fromkeys([*feature_blocks, *bottom_blocks]))
    for entries in (files, bottom.files if bottom else []):
        for entry in entries:  # each file's rows come block by block, in pass order
            positions = [order.index((entry.split.name, t)) for t in entry.transforms]
            if positions != sorted(positions):
                raise ValueError(f"cache file {entry.name}: its transforms are out of order")
    if bottom is not None:
        bottom_forward = compile_forward(bottom.bottom)
        top_forward = compile_forward(bottom.top, input_dtype="float32")
    elif forward is None:
        forward = compile_forward(extractor)
    splits = {entry.split.name: entry.split
              for entry in [*files, *(bottom.files if bottom else [])]}
    total = sum(len(splits[name]) for name, _ in order)
    started = time.perf_counter()
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out_dir))
        writers = {("features", entry.name): stack.enter_context(
            NpyWriter(tmp / f"{entry.name}.npy", (dim,), "float32")) for entry in files}
        if bottom is not None:
            bottom_tmp = stack.enter_context(atomic_dir(bottom.out_dir))
            shape = tuple(int(n) for n in bottom.bottom.output_shape[1:])
            writers.update({("bottom", entry.name): stack.enter_context(
                NpyWriter(bottom_tmp / f"{entry.name}.npy", shape, "float32"))
                for entry in bottom.files})
        bar = stack.enter_context(progress(total=total, desc="backbone passes", unit="images",
                                           enabled=show_progress))
        for name, transform in order:
            feature_to = [writers["features", file]
                          for file in feature_blocks.get((name, transform), [])]
            bottom_to = [writers["bottom", file]
                         for file in bottom_blocks.get((name, transform), [])]
            if bottom is None:
                batches = ((None, rows) for rows in
                           forward_batches(forward, trimmed_dir, splits[name], transform))
            else:
                batches = _two_part_batches(bottom_forward, top_forward if feature_to else None,
                                            trimmed_dir, splits[name], transform)
            for cut, features in batches:
                for writer in bottom_to:
                    writer.extend(cut)
                for writer in feature_to:
                    writer.extend(features)
                bar.update(len(cut if features is None else features))
        (tmp / "meta.json").write_text(json.dumps(
            {**metadata, "dim": dim, "images": sum(entry.rows for entry in files),
             "files": {entry.name: entry.rows for entry in files}}, indent=2) + "\n")
        if bottom is not None:
            (bottom_tmp / "meta.json").write_text(json.dumps(
                {**bottom.metadata, "cached": True, "shape": list(shape),
                 "files": {entry.name: entry.rows for entry in bottom.files}},
                indent=2) + "\n")
    return FeatureResult(total, time.perf_counter() - started, dim)


def _two_part_batches(bottom_forward, top_forward, trimmed_dir: Path, split: Split,
                      transform):
    """(frozen-bottom outputs, pooled features or None) per batch of ``split``'s images."""
    dataset = image_dataset(trimmed_dir, split, bottom_forward.batch_size, with_labels=False,
                            fixed_batches=True, transform=transform,
                            size=bottom_forward.input_size if transform else None)
    for images, count in dataset:
        cut = bottom_forward(images).numpy().astype("float32", copy=False)
        features = (top_forward(cut).numpy()[:int(count)].astype("float32", copy=False)
                    if top_forward else None)
        yield cut[:int(count)], features


def no_bottom_cache(out_dir: Path, reason: str) -> None:
    """The cache folder DVC expects, saying why the fine-tune builds no cache from it."""
    with atomic_dir(out_dir) as tmp:
        (tmp / "meta.json").write_text(json.dumps({"cached": False, "reason": reason},
                                                  indent=2) + "\n")


def run(params: Params, trimmed: Path, split: Path, out: Path, metrics: Path,
        bottom_out: Path) -> str:
    import keras

    from foodtransfer.models.classifiers import (build_feature_extractor, frozen_bottom_cut,
                                                 get_backbone_model, split_frozen_bottom,
                                                 unfreeze_top)
    from foodtransfer.training.distribute import configure_gpus

    configure_gpus()
    config, tune = params.features, params.finetune
    size = crop_size(params.image_size, config.crop)
    # The backbone's initial weights when weights=none: part of the data, like the split, so
    # that sweeping the training seed re-extracts nothing.
    keras.utils.set_random_seed(params.data.seed)
    # Deterministic kernels: a re-run gives the same bytes (on a GPU too), so DVC does not
    # see new features and re-run everything downstream (cost: bench/determinism.py).
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    splits = load_splits(split)
    extractor = build_feature_extractor(params.backbone, params.weights, size)
    files = feature_files(splits, params.image_size, size, views=config.views, tta=config.tta,
                          seed=params.data.seed)
    version = data_version(split)
    metadata = {"backbone": params.backbone, "weights": params.weights,
                "image_size": params.image_size, "backbone_input": size}
    bottom = None
    if not tune.cache_frozen or tune.augment:
        reason = ("finetune.cache_frozen is false" if not tune.cache_frozen else
                  "finetune.augment is true") + ": the fine-tune makes full passes"
    else:
        # The fine-tune's cut: where it will unfreeze (trainable flags do not change inference).
        backbone = get_backbone_model(extractor)
        unfreeze_top(backbone, tune.unfreeze)
        parts = split_frozen_bottom(backbone)
        reason = (f"finetune.unfreeze = {tune.unfreeze} leaves no frozen bottom to cache"
                  if parts is None else "")
        if parts is not None:
            cut_bottom, cut_top = frozen_bottom_cut(extractor, *parts)
            bottom = BottomCache(
                cut_bottom, cut_top,
                bottom_files(splits, params.image_size, size, views=tune.views,
                             tta=config.tta, seed=params.data.seed),
                bottom_out, {**metadata, "unfreeze": tune.unfreeze,
                             "cut_layer": parts[0].layers[-1].name, "views": tune.views,
                             "tta": config.tta, "seed": params.data.seed,
                             "data_version": version})
    result = extract_features(extractor, trimmed, files, out, metadata={
        **metadata, "views": config.views, "tta": config.tta, "data_version": version},
        bottom=bottom)
    if bottom is None:
        no_bottom_cache(bottom_out, reason)
    # Timings go to a metrics file, not into the features folder: its hash stays the same
    # when the same features are extracted again, so downstream stages are not re-run.
    write_text(metrics, json.dumps({
        "images": result.images, "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2)}, indent=2) + "\n")
    return (f"{params.backbone} features ({result.dim}-d, {size} px) of "
            f"{sum(entry.rows for entry in files)} images "
            f"({config.views} augmented views per training image, mirror images "
            f"{'too' if config.tta else 'not'})"
            + (f" and the fine-tune's frozen-bottom cache ({tune.views} views)" if bottom
               else "")
            + f": {result.images} backbone passes at {result.images_per_second:.1f} "
            f"images/s into {out}" + (f" and {bottom_out}" if bottom else ""))
