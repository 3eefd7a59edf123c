"""Stage ``baseline``: a small CNN trained from scratch on the images (params section
``baseline``), and the same network untrained as the chance reference."""

from __future__ import annotations

from pathlib import Path

from foodtransfer.config import Params
from foodtransfer.data.datasets import image_dataset
from foodtransfer.data.manifests import load_classes, load_splits
from foodtransfer.evaluation import evaluate
from foodtransfer.models.classifiers import build_baseline
from foodtransfer.models.inference import compile_forward, predict_split
from foodtransfer.results import (VariantPaths, finish_image_model, staged_outputs,
                                  variant_run)
from foodtransfer.training.distribute import prepare_training
from foodtransfer.training.loop import fit


def run(params: Params, trimmed: Path, split: Path, outputs: VariantPaths) -> str:
    setup = prepare_training(params)
    class_names = load_classes(trimmed)
    splits = load_splits(split)
    config = params.baseline
    with setup.strategy.scope():
        model = build_baseline(len(class_names), config.image_size,
                               input_size=params.image_size, augment=config.augment,
                               seed=params.seed)
    batch = params.batch_size
    train = image_dataset(trimmed, splits["train"], batch, shuffle=True, seed=params.seed)
    val = image_dataset(trimmed, splits["val"], batch)
    # Outputs land after the MLflow run ended FINISHED (staged_outputs outside variant_run).
    with staged_outputs(outputs) as staged, \
            variant_run(params, "baseline", split, setup) as run:
        untrained = evaluate(predict_split(compile_forward(model), trimmed, splits["test"]),
                             splits["test"].labels, class_names)
        with setup.strategy.scope():
            history = fit(model, train, val, epochs=config.epochs,
                          learning_rate=config.learning_rate, optimizer=params.optimizer,
                          lr_schedule=params.lr_schedule, patience=params.patience,
                          keep_epoch=params.keep_epoch, num_classes=len(class_names),
                          batch_size=batch,
                          train_examples=len(splits["train"]), on_epoch=run.log_epoch)
        what = (f"baseline: a small CNN trained from scratch on the images (resized to "
                f"{config.image_size} px{', augmented' if config.augment else ''}), no "
                f"ImageNet weights; untrained it scores {untrained.metrics['test_accuracy']:.3f}"
                " on test (chance).")
        return finish_image_model(
            "baseline", model, history, trimmed, splits, class_names, run, staged,
            {"untrained_test_accuracy": untrained.metrics["test_accuracy"], **setup.record()},
            what, precision_policy=setup.precision_policy)
