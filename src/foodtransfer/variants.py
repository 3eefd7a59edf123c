"""The model stages: features, baseline, transfer, dropout and fine-tune.

Each variant stage trains under the ``strategy`` and ``mixed_precision`` params (every model it
trains is built and compiled inside ``strategy.scope()``; see :mod:`foodtransfer.distribute`),
evaluates on the held-out test set (never used for early stopping or selection), and writes the
same numbers to MLflow (one run per variant) and to the files that dvc.yaml declares:
``metrics/<variant>.json``, ``plots/<variant>/{history,predictions}.csv``, ``artifacts/<variant>/``
(figures, report) and ``models/<variant>/``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foodtransfer import plots
from foodtransfer.atomic import atomic_dir, scratch_dir, write_text
from foodtransfer.config import Params, flatten
from foodtransfer.datasets import (Split, image_dataset, load_classes, load_features,
                                   load_splits)
from foodtransfer.errors import DataError
from foodtransfer.evaluation import Evaluation, evaluate
from foodtransfer.split import data_version
from foodtransfer.training import History

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "top5", "val_loss", "val_accuracy", "val_top5",
                   "learning_rate")


@dataclass(frozen=True)
class Paths:
    """Where a variant stage reads and writes (project-relative by default)."""

    trimmed: Path = Path("data/trimmed")
    split: Path = Path("data/split")
    features: Path = Path("data/features")
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")
    artifacts: Path = Path("artifacts")


def seed_everything(seed: int) -> None:
    """Same params, same machine -> same metrics."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@dataclass(frozen=True)
class Training:
    """How a variant stage trains: its ``tf.distribute`` strategy and Keras precision policy."""

    strategy: Any
    precision_policy: str

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def record(self) -> dict[str, Any]:
        """What the metrics file (and, where numeric, MLflow's metrics) say about it."""
        return {"replicas": self.replicas, "precision_policy": self.precision_policy}

    def tags(self) -> dict[str, str]:
        return {"replicas": str(self.replicas), "precision_policy": self.precision_policy}


def prepare_training(params: Params) -> Training:
    """The strategy and precision policy of ``params``, set up before any model is built."""
    from foodtransfer.distribute import make_strategy, set_precision_policy

    # The strategy first: MultiWorkerMirroredStrategy must exist before other TensorFlow ops.
    strategy = make_strategy(params.strategy)
    policy = set_precision_policy(params.mixed_precision)
    seed_everything(params.seed)
    return Training(strategy, policy)


def _predict_images(model, trimmed: Path, split: Split, batch_size: int) -> np.ndarray:
    """Probabilities for a split's images, streamed through one compiled forward pass."""
    import tensorflow as tf

    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    dataset = image_dataset(trimmed, split, batch_size, with_labels=False)
    return np.concatenate([forward(images).numpy() for images in dataset])


def _history_csv(rows: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in HISTORY_COLUMNS})
    return buffer.getvalue()


def _predictions_csv(split: Split, predicted: np.ndarray, probabilities: np.ndarray,
                     class_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_id", "actual", "predicted", "probability"])
    for image_id, label, guess, probs in zip(split.image_ids, split.labels, predicted,
                                             probabilities):
        writer.writerow([image_id, class_names[label], class_names[guess],
                         f"{float(probs[guess]):.6f}"])
    return buffer.getvalue()


class VariantOutputs:
    """Writes one variant's DVC outputs and mirrors them into its MLflow run."""

    def __init__(self, variant: str, paths: Paths, class_names: list[str], run) -> None:
        self.variant = variant
        self.paths = paths
        self.class_names = class_names
        self.run = run

    def finish(self, *, history: History, test: Evaluation, validation: Evaluation,
               test_probabilities: np.ndarray, test_split: Split, extra: dict[str, float],
               curve_rows: list[dict[str, float]] | None = None) -> dict[str, Any]:
        variant, paths = self.variant, self.paths
        best_epoch = history.best_epoch()
        metrics: dict[str, Any] = {
            **test.metrics, **validation.metrics,
            "epochs_run": history.epochs_run, "best_epoch": best_epoch,
            "seconds_per_epoch": round(history.seconds_per_epoch, 4),
            **extra,
        }
        metrics_file = {**metrics, "per_class": test.per_class}
        write_text(paths.metrics / f"{variant}.json", json.dumps(metrics_file, indent=2) + "\n")
        plot_dir = paths.plots / variant
        write_text(plot_dir / "history.csv", _history_csv(history.rows))
        write_text(plot_dir / "predictions.csv", _predictions_csv(
            test_split, test.predicted, test_probabilities, self.class_names))
        with atomic_dir(paths.artifacts / variant) as tmp:
            plots.learning_curves(curve_rows or history.rows, best_epoch,
                                  f"{variant}: learning curves", tmp / "learning_curves.png")
            plots.confusion(test.confusion, self.class_names,
                            f"{variant}: test confusion matrix "
                            f"(accuracy {test.metrics['test_accuracy']:.3f})",
                            tmp / "confusion.png")
            (tmp / "classification_report.txt").write_text(test.report_text)
            (tmp / "classes.json").write_text(json.dumps(self.class_names, indent=1) + "\n")
            # Which MLflow run produced these outputs: the report stage groups and links runs.
            (tmp / "mlflow_run.json").write_text(json.dumps(
                {"variant": variant, "run_id": self.run.run_id}, indent=1) + "\n")
        self.run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for name in ("learning_curves.png", "confusion.png", "classification_report.txt",
                     "classes.json"):
            self.run.log_artifact(paths.artifacts / variant / name)
        for name in ("history.csv", "predictions.csv"):
            self.run.log_artifact(plot_dir / name, "dvc_plots")
        self.run.log_artifact(paths.metrics / f"{variant}.json", "dvc_metrics")
        return metrics


def _open_run(params: Params, variant: str, paths: Paths, training: Training):
    from foodtransfer import tracking

    return tracking.variant_run(params.mlflow.experiment, variant, flatten(params),
                                {"data_version": data_version(paths.split),
                                 "backbone": params.backbone, **training.tags()})


def _example_images(trimmed: Path, split: Split, count: int = 1) -> np.ndarray:
    from foodtransfer.images import ImageStore

    store = ImageStore(trimmed / f"{split.stores[0]}.npy")
    return store.read(split.indices[:count]).astype("float32")


# --------------------------------------------------------------------------------- features
def run_features(params: Params, paths: Paths) -> str:
    from foodtransfer.features import extract_features
    from foodtransfer.models import build_feature_extractor

    seed_everything(params.seed)
    splits = load_splits(paths.split)
    extractor = build_feature_extractor(params.backbone, params.weights, params.image_size)
    result = extract_features(extractor, paths.trimmed, splits, paths.features, metadata={
        "backbone": params.backbone, "weights": params.weights, "image_size": params.image_size,
        "data_version": data_version(paths.split)})
    # Timings go to a metrics file, not into data/features: its hash stays the same when the
    # same features are extracted again, so downstream stages are not re-run.
    write_text(paths.metrics / "features.json", json.dumps({
        "images": result.images, "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2)}, indent=2) + "\n")
    return (f"{params.backbone} features ({result.dim}-d) of {result.images} images at "
            f"{result.images_per_second:.1f} images/s into {paths.features}")


# --------------------------------------------------------------------------------- baseline
def run_baseline(params: Params, paths: Paths) -> str:
    from foodtransfer.models import build_baseline, compile_classifier, make_optimizer
    from foodtransfer.training import fit

    training = prepare_training(params)
    class_names = load_classes(paths.trimmed)
    splits = load_splits(paths.split)
    config = params.baseline
    with training.strategy.scope():
        model = build_baseline(len(class_names), config.image_size,
                               input_size=params.image_size, augment=config.augment,
                               seed=params.seed)
        compile_classifier(model, make_optimizer(params.optimizer, config.learning_rate),
                           len(class_names))
    batch = params.batch_size
    train = image_dataset(paths.trimmed, splits["train"], batch, shuffle=True, seed=params.seed)
    val = image_dataset(paths.trimmed, splits["val"], batch)
    with _open_run(params, "baseline", paths, training) as run:
        untrained = evaluate(_predict_images(model, paths.trimmed, splits["test"], batch),
                             splits["test"].labels, class_names)
        steps = -(-len(splits["train"]) // batch)
        with training.strategy.scope():
            history = fit(model, train, val, epochs=config.epochs,
                          learning_rate=config.learning_rate, optimizer=params.optimizer,
                          lr_schedule=params.lr_schedule, patience=params.patience,
                          num_classes=len(class_names), steps_per_epoch=steps,
                          on_epoch=run.log_epoch)
        return _finish_image_model("baseline", model, history, params, paths, splits,
                                   class_names, run,
                                   {"untrained_test_accuracy": untrained.metrics["test_accuracy"],
                                    **training.record()})


def _finish_image_model(variant: str, model, history: History, params: Params, paths: Paths,
                        splits: dict[str, Split], class_names: list[str], run,
                        extra: dict[str, float],
                        curve_rows: list[dict[str, float]] | None = None) -> str:
    from foodtransfer.models import parameter_counts

    batch = params.batch_size
    test_probs = _predict_images(model, paths.trimmed, splits["test"], batch)
    val_probs = _predict_images(model, paths.trimmed, splits["val"], batch)
    test = evaluate(test_probs, splits["test"].labels, class_names)
    validation = evaluate(val_probs, splits["val"].labels, class_names, prefix="best_val_")
    total, trainable = parameter_counts(model)
    outputs = VariantOutputs(variant, paths, class_names, run)
    metrics = outputs.finish(history=history, test=test, validation=validation,
                             test_probabilities=test_probs, test_split=splits["test"],
                             extra={**extra, "total_params": total,
                                    "trainable_params": trainable},
                             curve_rows=curve_rows)
    with atomic_dir(paths.models / variant) as tmp:
        model.save(tmp / "model.keras")
        (tmp / "classes.json").write_text(json.dumps(class_names) + "\n")
    run.log_model(paths.models / variant / "model.keras", paths.models / variant / "classes.json",
                  _example_images(paths.trimmed, splits["test"]))
    return _summary(variant, metrics, history)


def _summary(variant: str, metrics: dict[str, Any], history: History) -> str:
    return (f"{variant}: test accuracy {metrics['test_accuracy']:.3f}, top-5 "
            f"{metrics['test_top5_accuracy']:.3f}, macro F1 {metrics['test_macro_f1']:.3f}; "
            f"{history.epochs_run} epochs (best {history.best_epoch()}), "
            f"{history.seconds_per_epoch:.2f} s/epoch")


# ------------------------------------------------------------------------- transfer/dropout
def run_head(params: Params, paths: Paths, variant: str) -> str:
    """Train the transfer (plain) or dropout (Dropout + L1L2) head on the cached features."""
    from foodtransfer.models import (build_feature_extractor, build_head,
                                     build_image_classifier, parameter_counts)
    from foodtransfer.training import fit, predict_array

    training = prepare_training(params)
    class_names = load_classes(paths.trimmed)
    splits = load_splits(paths.split)
    features = {name: load_features(paths.features, name) for name in splits}
    for name, split in splits.items():
        if len(features[name]) != len(split):
            raise DataError(f"{paths.features}/{name}.npy has {len(features[name])} rows but "
                            f"the {name} manifest {len(split)}: run 'dvc repro features'.")
    regularised = variant == "dropout"
    with training.strategy.scope():
        head = build_head(features["train"].shape[1], len(class_names),
                          dropout=params.dropout if regularised else 0.0,
                          l1=params.l1 if regularised else 0.0,
                          l2=params.l2 if regularised else 0.0)
    steps = -(-len(splits["train"]) // params.batch_size)
    with _open_run(params, variant, paths, training) as run:
        with training.strategy.scope():
            history = fit(head, (features["train"], splits["train"].labels),
                          (features["val"], splits["val"].labels), epochs=params.epochs,
                          learning_rate=params.learning_rate, optimizer=params.optimizer,
                          lr_schedule=params.lr_schedule, patience=params.patience,
                          num_classes=len(class_names), steps_per_epoch=steps,
                          batch_size=params.batch_size, on_epoch=run.log_epoch,
                          seed=params.seed)
        test_probs = predict_array(head, features["test"])
        val_probs = predict_array(head, features["val"])
        test = evaluate(test_probs, splits["test"].labels, class_names)
        validation = evaluate(val_probs, splits["val"].labels, class_names, prefix="best_val_")
        # The deployable model: raw images in, probabilities out (backbone + trained head).
        # Built under the precision policy, so fine-tuning it trains in that precision too.
        extractor = build_feature_extractor(params.backbone, params.weights, params.image_size)
        classifier = build_image_classifier(extractor, head)
        example = _example_images(paths.trimmed, splits["test"], 2)
        drift = float(np.max(np.abs(predict_array(classifier, example) - test_probs[:2])))
        # The features were extracted in float32; a float16 backbone differs by more.
        tolerance = 1e-3 if training.precision_policy == "float32" else 2e-2
        if drift > tolerance:
            log.warning("image model and cached-feature head disagree by %.2g", drift)
        total, trainable = parameter_counts(classifier)
        outputs = VariantOutputs(variant, paths, class_names, run)
        metrics = outputs.finish(history=history, test=test, validation=validation,
                                 test_probabilities=test_probs, test_split=splits["test"],
                                 extra={"total_params": total, "trainable_params": trainable,
                                        "head_params": parameter_counts(head)[0],
                                        "feature_model_drift": drift, **training.record()})
        with atomic_dir(paths.models / variant) as tmp:
            head.save(tmp / "head.keras")
            classifier.save(tmp / "model.keras")
            (tmp / "classes.json").write_text(json.dumps(class_names) + "\n")
        run.log_model(paths.models / variant / "model.keras",
                      paths.models / variant / "classes.json", example[:1])
        return _summary(variant, metrics, history)


# -------------------------------------------------------------------------------- fine-tune
def run_finetune(params: Params, paths: Paths) -> str:
    import keras

    from foodtransfer.models import (compile_classifier, get_backbone_model, make_optimizer,
                                     split_frozen_bottom, unfreeze_top)
    from foodtransfer.training import fit, learning_rate_for

    training = prepare_training(params)
    class_names = load_classes(paths.trimmed)
    splits = load_splits(paths.split)
    source = paths.models / "dropout" / "model.keras"
    if not source.is_file():
        raise DataError(f"{source} is missing: run 'dvc repro dropout' first.")
    config = params.fine_tune
    with training.strategy.scope():
        model = keras.saving.load_model(source)
        backbone = get_backbone_model(model)
        unfrozen = unfreeze_top(backbone, config.unfreeze)
        if config.augment:
            from foodtransfer.models import augmentation

            inputs = keras.Input(model.input_shape[1:], name="image")
            model = keras.Model(inputs, model(augmentation(params.seed)(inputs)),
                                name="image_classifier")
    parts = split_frozen_bottom(backbone) if config.cache_frozen and not config.augment else None
    dropout_rows = _read_history(paths.plots / "dropout" / "history.csv")
    first_epoch = (int(dropout_rows[-1]["epoch"]) if dropout_rows else 0) + 1
    batch = params.batch_size
    steps = -(-len(splits["train"]) // batch)
    learning_rate = params.learning_rate * config.lr_scale
    extra: dict[str, Any] = {"unfrozen_layers": unfrozen, "first_epoch": first_epoch,
                             **training.record()}
    with _open_run(params, "finetune", paths, training) as run, \
            scratch_dir(paths.models / "finetune-bottom") as scratch:
        if parts is not None:
            # Exact shortcut: the frozen bottom's output per image never changes, so compute
            # it once (to disk); each epoch then runs only the unfrozen top and the head.
            started = time.perf_counter()
            trainable_model, train, val = _cached_bottom_setup(
                model, *parts, paths, splits, batch, params.seed, training.strategy, scratch)
            extra["bottom_cache_seconds"] = round(time.perf_counter() - started, 3)
            extra["cached_bottom"] = 1
        else:
            trainable_model = model
            train = image_dataset(paths.trimmed, splits["train"], batch, shuffle=True,
                                  seed=params.seed)
            val = image_dataset(paths.trimmed, splits["val"], batch)
            extra["cached_bottom"] = 0
        run.set_tags({"unfrozen_layers": str(unfrozen), "starts_from": "dropout",
                      "cached_bottom": str(bool(parts))})
        with training.strategy.scope():
            compile_classifier(trainable_model, make_optimizer(
                params.optimizer, learning_rate_for(params.lr_schedule, learning_rate,
                                                    max(1, config.epochs), steps)),
                len(class_names))
            history = fit(trainable_model, train, val, epochs=config.epochs,
                          learning_rate=learning_rate, optimizer=params.optimizer,
                          lr_schedule=params.lr_schedule, patience=params.patience,
                          num_classes=len(class_names), steps_per_epoch=steps,
                          first_epoch=first_epoch, on_epoch=run.log_epoch,
                          recompile=False) if config.epochs else History()
        # The full image model shares every layer with the trained one: evaluate and log it.
        return _finish_image_model("finetune", model, history, params, paths, splits,
                                   class_names, run, extra,
                                   curve_rows=dropout_rows + history.rows)


def _cached_bottom_setup(model, bottom, top, paths: Paths, splits: dict[str, Split],
                         batch: int, seed: int, strategy, scratch: Path):
    """(model from the cut to the probabilities, train dataset, validation dataset), the
    datasets reading the frozen bottom's outputs, computed once for every image and written
    to ``scratch`` (streamed: memory does not grow with the number of images). The model is
    created in ``strategy``'s scope, to be compiled and trained there."""
    import keras

    from foodtransfer.datasets import npy_dataset
    from foodtransfer.features import compile_forward, write_outputs

    extractor = next(layer for layer in model.layers if layer.name.endswith("_features"))
    head = model.get_layer("head")
    names = [layer.name for layer in extractor.layers]
    image = keras.Input(model.input_shape[1:], name="image")
    x = extractor.get_layer("preprocess")(image) if "preprocess" in names else image
    bottom_model = keras.Model(image, bottom(x, training=False), name="frozen_bottom")
    forward = compile_forward(bottom_model)
    for name in ("train", "val"):
        write_outputs(forward, paths.trimmed, splits[name], scratch / f"{name}.npy")
    with strategy.scope():
        cut = keras.Input(bottom.output_shape[1:], name="frozen_bottom_output")
        outputs = head(extractor.get_layer("pool")(top(cut, training=False)))
        trainable_model = keras.Model(cut, outputs, name="finetune_top")
    train = npy_dataset(scratch / "train.npy", splits["train"].labels, batch, shuffle=True,
                        seed=seed)
    val = npy_dataset(scratch / "val.npy", splits["val"].labels, batch)
    return trainable_model, train, val


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(handle)]
