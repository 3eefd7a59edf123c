"""Stage ``finetune``: the trained dropout model with the top ``finetune.unfreeze`` backbone
layers unfrozen (BatchNormalization stays frozen), trained on at ``learning_rate ×
finetune.lr_scale`` (params section ``finetune``).

When nothing random happens inside the model before the unfrozen layers, the frozen bottom's
output for each image never changes: it is computed once, streamed to a scratch file beside the
model folder, and each epoch runs only the unfrozen top and the head (exact, much faster). With
``finetune.views``, that cache also holds the bottom's output for as many seeded augmented
views of each training image (the features stage's views), and epoch e trains on view
e mod (views + 1): augmented fine-tuning at the cost of plain epochs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from foodtransfer.atomic import scratch_dir
from foodtransfer.config import Params
from foodtransfer.data.augment import crop_transform, view_transform
from foodtransfer.data.datasets import image_dataset, npy_dataset, views_dataset
from foodtransfer.data.images import NpyWriter
from foodtransfer.data.manifests import Split, load_classes, load_splits
from foodtransfer.errors import DataError
from foodtransfer.models.classifiers import (augmentation, get_backbone_model,
                                             split_frozen_bottom, unfreeze_top)
from foodtransfer.models.inference import compile_forward, write_outputs
from foodtransfer.progress import progress
from foodtransfer.results import (VariantPaths, finish_image_model, read_history,
                                  variant_run)
from foodtransfer.training import hyperrule
from foodtransfer.training.distribute import prepare_training
from foodtransfer.training.loop import History, fit


def cached_bottom_model(model, bottom, top, trimmed: Path, splits: dict[str, Split],
                        scratch: Path, strategy, *, views: int = 0, seed: int = 0):
    """The model from the cut to the probabilities (created in ``strategy``'s scope, to be
    trained there), after writing the frozen bottom's output for every validation image to
    ``scratch/val.npy`` and for every training image and then each of its ``views``
    augmented views to ``scratch/train.npy`` (streamed: memory does not grow with the
    images)."""
    import keras

    extractor = next(layer for layer in model.layers if layer.name.endswith("_features"))
    head = model.get_layer("head")
    names = [layer.name for layer in extractor.layers]
    size = extractor.input_shape[1]
    image = keras.Input((size, size, 3), name="image")
    x = extractor.get_layer("preprocess")(image) if "preprocess" in names else image
    forward = compile_forward(keras.Model(image, bottom(x, training=False),
                                          name="frozen_bottom"))
    plain = crop_transform(size) if size != model.input_shape[1] else None
    total = len(splits["val"]) + len(splits["train"]) * (views + 1)
    with progress(total=total, desc="frozen-bottom cache", unit="images") as bar:
        write_outputs(forward, trimmed, splits["val"], scratch / "val.npy", bar.update,
                      transform=plain)
        with NpyWriter(scratch / "train.npy", forward.output_shape, "float32") as writer:
            for transform in [plain] + [view_transform(size, seed, view)
                                        for view in range(1, views + 1)]:
                write_outputs(forward, trimmed, splits["train"], writer.path, bar.update,
                              transform=transform, append=writer)
    with strategy.scope():
        cut = keras.Input(bottom.output_shape[1:], name="frozen_bottom_output")
        outputs = head(extractor.get_layer("pool")(top(cut, training=False)))
        return keras.Model(cut, outputs, name="finetune_top")


def run(params: Params, trimmed: Path, split: Path, start_model: Path, start_history: Path,
        outputs: VariantPaths) -> str:
    import keras

    setup = prepare_training(params)
    class_names = load_classes(trimmed)
    splits = load_splits(split)
    source = start_model / "model.keras"
    if not source.is_file():
        raise DataError(f"{source} is missing: run 'dvc repro dropout' first.")
    config = params.finetune
    with setup.strategy.scope():
        model = keras.saving.load_model(source, compile=False)  # compiled below, as fit does
        backbone = get_backbone_model(model)
        unfrozen = unfreeze_top(backbone, config.unfreeze)
        if config.augment:
            inputs = keras.Input(model.input_shape[1:], name="image")
            model = keras.Model(inputs, model(augmentation(params.seed)(inputs)),
                                name="image_classifier")
    parts = split_frozen_bottom(backbone) if config.cache_frozen and not config.augment else None
    start_rows = read_history(start_history)
    first_epoch = (int(start_rows[-1]["epoch"]) if start_rows else 0) + 1
    batch = params.batch_size
    extra: dict[str, Any] = {"unfrozen_layers": unfrozen, "first_epoch": first_epoch,
                             **setup.record()}
    with variant_run(params, "finetune", split, setup,
                     {"backbone": params.backbone}) as run, \
            scratch_dir(outputs.model.with_name(outputs.model.name + "-bottom")) as scratch:
        if parts is not None:
            started = time.perf_counter()
            trainable_model = cached_bottom_model(model, *parts, trimmed, splits, scratch,
                                                  setup.strategy, views=config.views,
                                                  seed=params.data.seed)
            train = views_dataset(scratch / "train.npy", splits["train"].labels, batch,
                                  views=config.views, epochs=config.epochs, seed=params.seed)
            val = npy_dataset(scratch / "val.npy", splits["val"].labels, batch)
            extra["bottom_cache_seconds"] = round(time.perf_counter() - started, 3)
        else:
            trainable_model = model
            train = image_dataset(trimmed, splits["train"], batch, shuffle=True,
                                  seed=params.seed)
            val = image_dataset(trimmed, splits["val"], batch)
        extra["cached_bottom"] = int(parts is not None)
        run.set_tags({"unfrozen_layers": str(unfrozen), "starts_from": "dropout",
                      "cached_bottom": str(parts is not None)})
        history = History()
        if config.epochs:
            with setup.strategy.scope():
                history = fit(trainable_model, train, val, epochs=config.epochs,
                              learning_rate=hyperrule.finetune_learning_rate(
                                  params.learning_rate, config.lr_scale),
                              optimizer=params.optimizer, lr_schedule=config.lr_schedule,
                              patience=params.patience, num_classes=len(class_names),
                              batch_size=batch, train_examples=len(splits["train"]),
                              first_epoch=first_epoch, on_epoch=run.log_epoch,
                              label_smoothing=config.label_smoothing,
                              dataset_spans_epochs=parts is not None)
        # The full image model shares every layer with the trained one: evaluate and log it.
        what = (f"finetune: the dropout model with its top {config.unfreeze} backbone layers "
                f"unfrozen ({unfrozen} trainable, BatchNormalization frozen), trained "
                f"{config.epochs} epochs at learning rate "
                f"{hyperrule.finetune_learning_rate(params.learning_rate, config.lr_scale):g} "
                f"({config.lr_schedule} schedule)"
                + (f" on {config.views} cached augmented views per image" if config.views
                   and parts is not None else "") + ".")
        return finish_image_model("finetune", model, history, trimmed, splits, class_names,
                                  run, outputs, extra, what,
                                  curve_rows=start_rows + history.rows)
