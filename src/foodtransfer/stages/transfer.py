"""Stage ``transfer``: a softmax head trained on the cached features of the frozen ImageNet
backbone (top-level params ``epochs``, ``learning_rate``, ``optimizer``, ...).

:func:`train_head` is also the ``dropout`` stage's training: the same head with Dropout and
an L1L2 kernel regulariser (:mod:`foodtransfer.stages.dropout`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from foodtransfer.config import Params
from foodtransfer.data.datasets import example_images, load_features
from foodtransfer.data.manifests import load_classes, load_splits
from foodtransfer.errors import DataError
from foodtransfer.evaluation import evaluate
from foodtransfer.models.classifiers import (build_feature_extractor, build_head,
                                             build_image_classifier, parameter_counts)
from foodtransfer.models.inference import predict_array
from foodtransfer.results import (VariantPaths, save_model, summary, variant_run,
                                  write_results)
from foodtransfer.training.distribute import prepare_training
from foodtransfer.training.loop import fit

log = logging.getLogger(__name__)


def train_head(params: Params, variant: str, *, trimmed: Path, split: Path, features: Path,
               outputs: VariantPaths, dropout: float, l1: float, l2: float) -> str:
    """Train a head (``Dropout(dropout)`` when > 0, ``L1L2(l1, l2)`` when either is > 0) on the
    cached features, evaluate it, and save the deployable model: raw images in, probabilities
    out (backbone + trained head). Returns the stage's summary line."""
    setup = prepare_training(params)
    class_names = load_classes(trimmed)
    splits = load_splits(split)
    cached = {name: load_features(features, name) for name in splits}
    for name, part in splits.items():
        if len(cached[name]) != len(part):
            raise DataError(f"{features}/{name}.npy has {len(cached[name])} rows but the "
                            f"{name} manifest {len(part)}: run 'dvc repro features'.")
    with setup.strategy.scope():
        head = build_head(cached["train"].shape[1], len(class_names), dropout=dropout, l1=l1,
                          l2=l2)
    with variant_run(params, variant, split, setup,
                     {"backbone": params.backbone}) as run:
        with setup.strategy.scope():
            history = fit(head, (cached["train"], splits["train"].labels),
                          (cached["val"], splits["val"].labels), epochs=params.epochs,
                          learning_rate=params.learning_rate, optimizer=params.optimizer,
                          lr_schedule=params.lr_schedule, patience=params.patience,
                          num_classes=len(class_names), batch_size=params.batch_size,
                          train_examples=len(splits["train"]), on_epoch=run.log_epoch,
                          seed=params.seed)
        test_probs = predict_array(head, cached["test"])
        val_probs = predict_array(head, cached["val"])
        test = evaluate(test_probs, splits["test"].labels, class_names, intervals=True)
        validation = evaluate(val_probs, splits["val"].labels, class_names, prefix="best_val_")
        # Built under the precision policy, so fine-tuning it trains in that precision too.
        extractor = build_feature_extractor(params.backbone, params.weights, params.image_size)
        classifier = build_image_classifier(extractor, head)
        example = example_images(trimmed, splits["test"], 2)
        drift = float(np.max(np.abs(predict_array(classifier, example) - test_probs[:2])))
        # The features were extracted in float32; a float16 backbone differs by more.
        tolerance = 1e-3 if setup.precision_policy == "float32" else 2e-2
        if drift > tolerance:
            log.warning("image model and cached-feature head disagree by %.2g", drift)
        total, trainable = parameter_counts(classifier)
        metrics = write_results(variant, outputs, class_names, run, history=history, test=test,
                                validation=validation,
                                probabilities={"test": test_probs, "val": val_probs},
                                splits=splits,
                                extra={"total_params": total, "trainable_params": trainable,
                                       "head_params": parameter_counts(head)[0],
                                       "feature_model_drift": drift, **setup.record()})
        save_model(classifier, class_names, outputs, run, example[:1], head=head)
        return summary(metrics, history)


def run(params: Params, trimmed: Path, split: Path, features: Path,
        outputs: VariantPaths) -> str:
    return train_head(params, "transfer", trimmed=trimmed, split=split, features=features,
                      outputs=outputs, dropout=0.0, l1=0.0, l2=0.0)
