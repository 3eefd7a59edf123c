"""Stage ``finetune``: the trained dropout model with the top ``finetune.unfreeze`` backbone
layers unfrozen (BatchNormalization stays frozen), trained on at ``learning_rate ×
finetune.lr_scale`` (params section ``finetune``).

When nothing random happens inside the model before the unfrozen layers, the frozen bottom's
output for each image never changes: it is computed once and each epoch runs only the unfrozen
top and the head (exact, much faster). With ``finetune.views``, that cache also holds the
bottom's output for as many seeded augmented views of each training image (the features
stage's views), and epoch e trains on view e mod (views + 1): augmented fine-tuning at the cost
of plain epochs.

The features stage writes that cache (``--bottom``, data/bottom) in the backbone passes it
makes anyway; the fine-tune trains on it, and evaluates validation and test from it, after
checking it is its own (:func:`features_stage_cache`). Where it is not, the fine-tune says why
and streams its own to a scratch file beside the model folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foodtransfer.atomic import scratch_dir
from foodtransfer.config import Params
from foodtransfer.data.augment import crop_transform, view_transform
from foodtransfer.data.datasets import image_dataset, npy_dataset, views_dataset
from foodtransfer.data.images import NpyWriter
from foodtransfer.data.manifests import Split, data_version, load_classes, load_splits
from foodtransfer.errors import DataError
from foodtransfer.models.classifiers import (augmentation, feature_extractor_of,
                                             frozen_bottom_cut, get_backbone_model,
                                             split_frozen_bottom, unfreeze_top)
from foodtransfer.models.inference import (compile_forward, forward_batches, mirror_averaged,
                                           write_outputs)
from foodtransfer.progress import progress
from foodtransfer.results import (VariantPaths, finish_image_model, read_history,
                                  staged_outputs, variant_run)
from foodtransfer.training import hyperrule
from foodtransfer.training.distribute import prepare_training
from foodtransfer.training.loop import History, fit

log = logging.getLogger(__name__)


def top_model(model, top, strategy):
    """The trainable part of ``model`` from the cut to the probabilities (created in
    ``strategy``'s scope, to be trained there), sharing ``model``'s layers."""
    import keras

    extractor = feature_extractor_of(model)
    with strategy.scope():
        cut = keras.Input(top.input_shape[1:], name="frozen_bottom_output")
        outputs = model.get_layer("head")(extractor.get_layer("pool")(top(cut, training=False)))
        return keras.Model(cut, outputs, name="finetune_top")


def bottom_pass(model, bottom, top):
    """The frozen bottom's compiled forward pass over ``model``'s images, and the transform
    that gives it their centre crop (None: the images as they are)."""
    extractor = feature_extractor_of(model)
    size = extractor.input_shape[1]
    forward = compile_forward(frozen_bottom_cut(extractor, bottom, top)[0])
    return forward, crop_transform(size) if size != model.input_shape[1] else None


def write_bottom_cache(forward, plain, trimmed: Path, splits: dict[str, Split], scratch: Path,
                       *, views: int = 0, seed: int = 0) -> None:
    """Write ``forward``'s output (:func:`bottom_pass`) for every validation image to
    ``scratch/val.npy`` and for every training image and then each of its ``views`` augmented
    views to ``scratch/train.npy`` (streamed: memory does not grow with the images). The
    fine-tune's own cache, where the features stage's cannot serve."""
    total = len(splits["val"]) + len(splits["train"]) * (views + 1)
    with progress(total=total, desc="frozen-bottom cache", unit="images") as bar:
        write_outputs(forward, trimmed, splits["val"], scratch / "val.npy", bar.update,
                      transform=plain)
        with NpyWriter(scratch / "train.npy", forward.output_shape, "float32") as writer:
            for transform in [plain] + [view_transform(forward.input_size, seed, view)
                                        for view in range(1, views + 1)]:
                write_outputs(forward, trimmed, splits["train"], writer.path, bar.update,
                              transform=transform, append=writer)


def features_stage_cache(cache: Path, forward, plain, bottom, params: Params, trimmed: Path,
                         split_dir: Path, splits: dict[str, Split], *,
                         tolerance: float = 1e-4) -> tuple[dict | None, str]:
    """The meta of the features stage's frozen-bottom cache in ``cache`` where it is this
    fine-tune's (same data, backbone, cut and views, and the same numbers as its own bottom
    pass ``forward`` gives the first validation images, to ``tolerance`` relative to their
    scale), else None and why."""
    meta_path = cache / "meta.json"
    if not meta_path.is_file():
        return None, f"{meta_path} is missing"
    meta = json.loads(meta_path.read_text())
    if not meta.get("cached"):
        return None, f"the features stage cached no bottom ({meta.get('reason')})"
    tune = params.finetune
    expected = {"backbone": params.backbone, "weights": params.weights,
                "image_size": params.image_size, "unfreeze": tune.unfreeze,
                "cut_layer": bottom.layers[-1].name, "views": tune.views,
                "seed": params.data.seed, "data_version": data_version(split_dir),
                "shape": list(forward.output_shape)}
    stale = [f"{key} {meta.get(key)!r} (now {value!r})" for key, value in expected.items()
             if meta.get(key) != value]
    if stale:
        return None, (f"{cache} was made for other params: {', '.join(stale)}; "
                      "'dvc repro features' remakes it")
    rows = {"train": len(splits["train"]) * (tune.views + 1), "val": len(splits["val"]),
            "test": len(splits["test"])}
    for name, count in rows.items():
        if meta["files"].get(name) != count:
            return None, f"{cache}/{name}.npy holds {meta['files'].get(name)} rows, not {count}"
    fresh = next(forward_batches(forward, trimmed, splits["val"], plain))
    cached = np.load(cache / "val.npy", mmap_mode="r")[:len(fresh)]
    scale = max(float(np.abs(cached).max()), 1e-30)
    drift = float(np.abs(fresh - cached).max()) / scale
    if drift > tolerance:
        return None, (f"{cache} differs from this model's own frozen bottom (relative "
                      f"{drift:.2g}): the dropout model's backbone is not the features "
                      "stage's")
    return meta, ""


def cached_probabilities(trainable, cache: Path, tta: bool) -> dict[str, np.ndarray]:
    """Validation and test probabilities of the image model from the cached bottom outputs
    (mirror-averaged with ``tta``): the image model's own, to float rounding."""
    return {name: mirror_averaged(
        trainable, np.load(cache / f"{name}.npy", mmap_mode="r"),
        np.load(cache / f"{name}_flip.npy", mmap_mode="r") if tta else None)
        for name in ("test", "val")}


@dataclass
class TrainingData:
    """What the fine-tune trains on, by one of three paths (:func:`training_data`)."""

    model: Any  # the model fit trains: the image model, or its top above the cached bottom
    train: Any
    val: Any
    source: str  # "features stage", "built by finetune" or "none" (tag bottom_cache)
    cache_seconds: float | None = None

    @property
    def cached(self) -> bool:
        return self.source != "none"


def from_features_cache(model, parts, cache: Path, params: Params, splits, strategy
                        ) -> TrainingData:
    """Path 1: the features stage's frozen-bottom cache, checked to be this fine-tune's."""
    started = time.perf_counter()
    data = _cached_bottom(model, parts, cache, params, splits, strategy, "features stage")
    data.cache_seconds = round(time.perf_counter() - started, 3)
    return data


def from_own_cache(model, parts, forward, plain, params: Params, trimmed: Path, splits,
                   strategy, scratch: Path) -> TrainingData:
    """Path 2: the fine-tune streams its own frozen-bottom cache to ``scratch``."""
    started = time.perf_counter()
    write_bottom_cache(forward, plain, trimmed, splits, scratch, views=params.finetune.views,
                       seed=params.data.seed)
    data = _cached_bottom(model, parts, scratch, params, splits, strategy, "built by finetune")
    data.cache_seconds = round(time.perf_counter() - started, 3)
    return data


def _cached_bottom(model, parts, cache: Path, params: Params, splits, strategy, source: str
                   ) -> TrainingData:
    config, batch = params.finetune, params.batch_size
    return TrainingData(
        model=top_model(model, parts[1], strategy),
        train=views_dataset(cache / "train.npy", splits["train"].labels, batch,
                            views=config.views, epochs=config.epochs, seed=params.seed),
        val=npy_dataset(cache / "val.npy", splits["val"].labels, batch), source=source)


def from_images(model, params: Params, trimmed: Path, splits) -> TrainingData:
    """Path 3: the whole image model on the images (augmentation inside the model, or no
    frozen bottom to cache)."""
    batch = params.batch_size
    return TrainingData(model=model,
                        train=image_dataset(trimmed, splits["train"], batch, shuffle=True,
                                            seed=params.seed),
                        val=image_dataset(trimmed, splits["val"], batch), source="none")


def start_model(source: Path, params: Params, strategy):
    """The trained dropout model with the top of its backbone unfrozen (and the augmentation
    layers in front with ``finetune.augment``), its backbone and the unfrozen layer count."""
    import keras

    if not source.is_file():
        raise DataError(f"{source} is missing: run 'dvc repro dropout' first.")
    with strategy.scope():
        model = keras.saving.load_model(source, compile=False)  # compiled below, as fit does
        backbone = get_backbone_model(model)
        unfrozen = unfreeze_top(backbone, params.finetune.unfreeze)
        if params.finetune.augment:
            inputs = keras.Input(model.input_shape[1:], name="image")
            model = keras.Model(inputs, model(augmentation(params.seed)(inputs)),
                                name="image_classifier")
    return model, backbone, unfrozen


def describe(params: Params, unfrozen: int, cached: bool) -> str:
    config = params.finetune
    rate = hyperrule.finetune_learning_rate(params.learning_rate, config.lr_scale)
    return (f"finetune: the dropout model with its top {config.unfreeze} backbone layers "
            f"unfrozen ({unfrozen} trainable, BatchNormalization frozen), trained "
            f"{config.epochs} epochs at learning rate {rate:g} ({config.lr_schedule} schedule)"
            + (f" on {config.views} cached augmented views per image"
               if config.views and cached else "") + ".")


def run(params: Params, trimmed: Path, split: Path, bottom_cache: Path, start_model_dir: Path,
        start_history: Path, outputs: VariantPaths) -> str:
    setup = prepare_training(params)
    class_names = load_classes(trimmed)
    splits = load_splits(split)
    config = params.finetune
    model, backbone, unfrozen = start_model(start_model_dir / "model.keras", params,
                                            setup.strategy)
    parts = split_frozen_bottom(backbone) if config.cache_frozen and not config.augment else None
    meta = None
    if parts is not None:
        forward, plain = bottom_pass(model, *parts)
        # The cache is float32; a float16 backbone (mixed precision) differs by more.
        meta, why = features_stage_cache(
            bottom_cache, forward, plain, parts[0], params, trimmed, split, splits,
            tolerance=1e-4 if setup.precision_policy == "float32" else 2e-2)
        if meta is None:
            log.warning("finetune builds its own frozen-bottom cache: %s", why)
    start_rows = read_history(start_history)
    first_epoch = (int(start_rows[-1]["epoch"]) if start_rows else 0) + 1
    with staged_outputs(outputs) as staged, \
            variant_run(params, "finetune", split, setup,
                        {"backbone": params.backbone}) as run, \
            scratch_dir(outputs.model.with_name(outputs.model.name + "-bottom")) as scratch:
        if meta is not None:
            data = from_features_cache(model, parts, bottom_cache, params, splits,
                                       setup.strategy)
        elif parts is not None:
            data = from_own_cache(model, parts, forward, plain, params, trimmed, splits,
                                  setup.strategy, scratch)
        else:
            data = from_images(model, params, trimmed, splits)
        extra: dict[str, Any] = {"unfrozen_layers": unfrozen, "first_epoch": first_epoch,
                                 **setup.record(), "cached_bottom": int(data.cached),
                                 "bottom_from_features": int(meta is not None)}
        if data.cache_seconds is not None:
            extra["bottom_cache_seconds"] = data.cache_seconds
        run.set_tags({"unfrozen_layers": str(unfrozen), "starts_from": "dropout",
                      "cached_bottom": str(data.cached), "bottom_cache": data.source})
        history = History()
        if config.epochs:
            with setup.strategy.scope():
                history = fit(data.model, data.train, data.val, epochs=config.epochs,
                              learning_rate=hyperrule.finetune_learning_rate(
                                  params.learning_rate, config.lr_scale),
                              optimizer=params.optimizer, lr_schedule=config.lr_schedule,
                              patience=params.patience, keep_epoch=params.keep_epoch,
                              num_classes=len(class_names), batch_size=params.batch_size,
                              train_examples=len(splits["train"]), first_epoch=first_epoch,
                              on_epoch=run.log_epoch, label_smoothing=config.label_smoothing,
                              dataset_spans_epochs=data.cached)
        # The full image model shares every layer with the trained one: evaluate and log it,
        # from the cached bottom outputs of validation and test where they are the same images.
        probabilities = None
        if meta is not None:
            tta = any(layer.name == "tta" for layer in model.layers)
            if meta.get("tta") == tta:  # the image model mirrors its crop, as the cache does
                probabilities = cached_probabilities(data.model, bottom_cache, tta)
        return finish_image_model("finetune", model, history, trimmed, splits, class_names,
                                  run, staged, extra, describe(params, unfrozen, data.cached),
                                  curve_rows=start_rows + history.rows,
                                  probabilities=probabilities,
                                  precision_policy=setup.precision_policy)
