"""Stage ``transfer``: a softmax head trained on the cached features of the frozen ImageNet
backbone (top-level params ``epochs``, ``learning_rate``, ``optimizer``, ...).

:func:`train_head` is also the ``dropout`` stage's training: the same head with Dropout and
an L1L2 kernel regulariser (:mod:`foodtransfer.stages.dropout`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foodtransfer.config import Params
from foodtransfer.data.augment import crop_size
from foodtransfer.data.datasets import load_features
from foodtransfer.data.manifests import Split, load_classes, load_splits
from foodtransfer.errors import DataError
from foodtransfer.models.classifiers import (build_feature_extractor, build_head,
                                             build_image_classifier, parameter_counts)
from foodtransfer.models.inference import mirror_averaged
from foodtransfer.results import (VariantPaths, finish_image_model, staged_outputs,
                                  variant_run)
from foodtransfer.training.distribute import prepare_training
from foodtransfer.training.loop import fit

def load_cache(features: Path, splits: dict[str, Split], *, views: int, tta: bool
               ) -> dict[str, np.ndarray]:
    """The cached features the features stage wrote for these params, each checked against
    its manifest: ``train``, ``val``, ``test``, with ``views`` ``train_views`` and with
    ``tta`` ``val_flip`` and ``test_flip``."""
    expected = {name: len(part) for name, part in splits.items()}
    if views:
        expected["train_views"] = len(splits["train"]) * views
    if tta:
        expected.update(val_flip=len(splits["val"]), test_flip=len(splits["test"]))
    cached = {}
    for name, rows in expected.items():
        cached[name] = load_features(features, name)
        if len(cached[name]) != rows:
            raise DataError(f"{features}/{name}.npy has {len(cached[name])} rows, not the "
                            f"{rows} these params need: run 'dvc repro features'.")
    return cached


def training_pairs(cached: dict[str, np.ndarray], labels: np.ndarray, views: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The heads' training set: the features of every training image, then those of each of
    its ``views`` augmented views (the features stage writes them view by view: all images'
    view 1, then view 2, ...), each paired with its image's label."""
    rows = np.concatenate([cached["train"]] + ([cached["train_views"]] if views else []))
    return rows, np.tile(labels, views + 1)


def train_head(params: Params, variant: str, *, trimmed: Path, split: Path, features: Path,
               outputs: VariantPaths, dropout: float, l1: float, l2: float) -> str:
    """Train a head (``Dropout(dropout)`` when > 0, ``L1L2(l1, l2)`` when either is > 0) on the
    cached features, evaluate it, and save the deployable model: raw images in, probabilities
    out (backbone + trained head). Returns the stage's summary line."""
    import keras

    setup = prepare_training(params)
    class_names = load_classes(trimmed)
    splits = load_splits(split)
    config = params.features
    cached = load_cache(features, splits, views=config.views, tta=config.tta)
    train_x, train_y = training_pairs(cached, splits["train"].labels, config.views)
    with setup.strategy.scope():
        head = build_head(train_x.shape[1], len(class_names), dropout=dropout, l1=l1, l2=l2)
    # Outputs land after the MLflow run ended FINISHED (staged_outputs outside variant_run).
    with staged_outputs(outputs) as staged, \
            variant_run(params, variant, split, setup, {"backbone": params.backbone}) as run:
        with setup.strategy.scope():
            history = fit(head, (train_x, train_y), (cached["val"], splits["val"].labels),
                          epochs=params.epochs, learning_rate=params.learning_rate,
                          optimizer=params.optimizer, lr_schedule=params.lr_schedule,
                          patience=params.patience, keep_epoch=params.keep_epoch,
                          num_classes=len(class_names), batch_size=params.batch_size,
                          train_examples=len(train_x),
                          on_epoch=run.log_epoch, seed=params.seed)

        def probabilities(name: str) -> np.ndarray:
            return mirror_averaged(head, cached[name],
                                   cached[f"{name}_flip"] if config.tta else None)

        # Built under the precision policy, so fine-tuning it trains in that precision too;
        # seeded as the features stage seeds it, so that with weights=none too it is the
        # backbone the features (and the fine-tune's frozen-bottom cache) came from.
        keras.utils.set_random_seed(params.data.seed)
        extractor = build_feature_extractor(params.backbone, params.weights,
                                            crop_size(params.image_size, config.crop))
        classifier = build_image_classifier(extractor, head, image_size=params.image_size,
                                            tta=config.tta)
        regularised = (f" with Dropout({dropout:g}) and an L1L2({l1:g}, {l2:g}) kernel "
                       "regulariser" if dropout or l1 or l2 else "")
        what = (f"{variant}: a softmax head{regularised} on the cached features of the frozen "
                f"ImageNet {params.backbone} ({crop_size(params.image_size, config.crop)} px"
                + (" centre crop" if config.crop < 1 else "")
                + (f", {config.views} augmented views per training image" if config.views
                   else "")
                + (", mirror-averaged predictions" if config.tta else "") + ").")
        # The deployed model is the evaluated model: finish_image_model logs the image model
        # and checks that, loaded as predict and serve load it, it gives the probabilities
        # (from the cached features) that the metrics come from.
        return finish_image_model(
            variant, classifier, history, trimmed, splits, class_names, run, staged,
            {"head_params": parameter_counts(head)[0], **setup.record()}, what,
            probabilities={"test": probabilities("test"), "val": probabilities("val")},
            precision_policy=setup.precision_policy, head=head)


def run(params: Params, trimmed: Path, split: Path, features: Path,
        outputs: VariantPaths) -> str:
    return train_head(params, "transfer", trimmed=trimmed, split=split, features=features,
                      outputs=outputs, dropout=0.0, l1=0.0, l2=0.0)
