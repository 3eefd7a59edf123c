"""What a variant stage leaves behind, written once and mirrored into its MLflow run.

The DVC outputs of a variant (paths given on its command line by dvc.yaml): the metrics file
(``metrics/<variant>.json``), the plots folder (``history.csv``, ``predictions.csv``), the
artifacts folder (learning curves, confusion matrix, classification report, class names, the
MLflow run id) and the model folder. The same numbers and files go to the variant's MLflow run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foodtransfer import plots
from foodtransfer.atomic import atomic_dir, staged, write_text
from foodtransfer.config import Params, flatten
from foodtransfer.data.datasets import example_images
from foodtransfer.data.manifests import Split, data_version
from foodtransfer.errors import UserError
from foodtransfer.evaluation import Evaluation, evaluate
from foodtransfer.training.distribute import TrainingSetup
from foodtransfer.training.loop import History

# The deployed-model check: the logged model, loaded as predict and serve load it, must give the
# probabilities the reported metrics came from on these many validation images (spread evenly
# over the validation manifest), to this tolerance (largest absolute difference of a class
# probability): float rounding in float32; float16 compute (mixed precision) rounds more.
VERIFY_IMAGES = 16
VERIFY_TOLERANCE = {"float32": 1e-3, "mixed_float16": 2e-2}


class DeployedModelError(UserError):
    """The model a stage logged does not give the probabilities its metrics came from."""


HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "top5", "val_loss", "val_accuracy", "val_top5",
                   "learning_rate")


@dataclass(frozen=True)
class VariantPaths:
    """Where a variant stage writes (from its command line)."""

    metrics: Path  # metrics/<variant>.json
    plots: Path  # plots/<variant>/: history.csv, predictions.csv
    artifacts: Path  # artifacts/<variant>/
    model: Path  # models/<variant>/


def history_csv(rows: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in HISTORY_COLUMNS})
    return buffer.getvalue()


def read_history(path: Path) -> list[dict[str, float]]:
    """The rows of a ``history.csv`` (empty when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(handle)]


def predictions_csv(split: Split, predicted: np.ndarray, probabilities: np.ndarray,
                    class_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_id", "actual", "predicted", "probability"])
    for image_id, label, guess, probs in zip(split.image_ids, split.labels, predicted,
                                             probabilities):
        writer.writerow([image_id, class_names[label], class_names[guess],
                         f"{float(probs[guess]):.6f}"])
    return buffer.getvalue()


def description(what: str, metrics: dict[str, Any]) -> str:
    """A variant run's one-paragraph description: what it is, how it scored."""
    low, high = metrics.get("test_accuracy_ci_low"), metrics.get("test_accuracy_ci_high")
    interval = f" [{low:.3f}, {high:.3f}] (95 % bootstrap interval)" if low is not None else ""
    return (f"{what} Test accuracy {metrics['test_accuracy']:.3f}{interval}, top-5 "
            f"{metrics['test_top5_accuracy']:.3f}, macro F1 {metrics['test_macro_f1']:.3f}; "
            f"validation accuracy {metrics['best_val_accuracy']:.3f} at its kept epoch "
            f"{metrics['best_epoch']} of {metrics['epochs_run']} trained; "
            f"{metrics.get('trainable_params', 0):,} of {metrics.get('total_params', 0):,} "
            "parameters trained.")


def write_results(variant: str, paths: VariantPaths, class_names: list[str], run, *,
                  history: History, test: Evaluation, validation: Evaluation,
                  probabilities: dict[str, np.ndarray], splits: dict[str, Split],
                  extra: dict[str, Any], what: str,
                  curve_rows: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Write the metrics file, the plots and the artifacts of ``variant`` and log them to
    ``run`` (a :class:`foodtransfer.tracking.runs.TrackedRun`); returns the metrics.
    ``probabilities`` and ``splits`` hold the "test" and "val" predictions and images: the
    test predictions are a DVC plot, the validation ones an artifact (for paired tests).
    ``what`` says in a sentence what the variant is (the run's description starts with it)."""
    best_epoch = history.best_epoch()
    metrics: dict[str, Any] = {
        **test.metrics, **validation.metrics,
        "epochs_run": history.epochs_run, "best_epoch": best_epoch,
        "seconds_per_epoch": round(history.seconds_per_epoch, 4),
        **extra,
    }
    # The numbers users compare (dvc exp show, dvc metrics diff); per-class detail is an
    # artifact (per_class.json), which keeps DVC's table readable.
    write_text(paths.metrics, json.dumps(metrics, indent=2) + "\n")
    write_text(paths.plots / "history.csv", history_csv(history.rows))
    write_text(paths.plots / "predictions.csv", predictions_csv(
        splits["test"], test.predicted, probabilities["test"], class_names))
    with atomic_dir(paths.artifacts) as tmp:
        plots.learning_curves(curve_rows or history.rows, best_epoch,
                              f"{variant}: learning curves", tmp / "learning_curves.png",
                              keep_epoch=history.keep_epoch)
        plots.confusion_figure([(test.confusion, f"{variant}: test confusion matrix (accuracy "
                                                 f"{test.metrics['test_accuracy']:.3f})")],
                               class_names, tmp / "confusion.png")
        (tmp / "classification_report.txt").write_text(test.report_text)
        (tmp / "per_class.json").write_text(json.dumps(test.per_class, indent=2) + "\n")
        (tmp / "val_predictions.csv").write_text(predictions_csv(
            splits["val"], validation.predicted, probabilities["val"], class_names))
        (tmp / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")
        # Which MLflow run produced these outputs: the report stage groups and links runs.
        (tmp / "mlflow_run.json").write_text(json.dumps(
            {"variant": variant, "run_id": run.run_id}, indent=1) + "\n")
    run.log_metrics({k: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in ("learning_curves.png", "confusion.png", "classification_report.txt",
                 "per_class.json", "classes.json", "val_predictions.csv"):
        run.log_artifact(paths.artifacts / name)
    for name in ("history.csv", "predictions.csv"):
        run.log_artifact(paths.plots / name, "dvc_plots")
    run.log_artifact(paths.metrics, "dvc_metrics")
    run.describe(description(what, metrics))
    return metrics


def save_model(model, class_names: list[str], paths: VariantPaths, run, example: np.ndarray,
               *, head=None) -> str:
    """Save the image model (and the head it ends with, when given) to the model folder and
    log it to ``run`` as the pyfunc model that predict and the registry use; returns its
    model URI."""
    with atomic_dir(paths.model) as tmp:
        if head is not None:
            head.save(tmp / "head.keras")
        model.save(tmp / "model.keras")
        (tmp / "classes.json").write_text(json.dumps(class_names) + "\n")
    return run.log_model(paths.model / "model.keras", paths.model / "classes.json", example)


def verification_indices(count: int, sample: int = VERIFY_IMAGES) -> np.ndarray:
    """Positions of the deployed-model check's images in a split of ``count`` images: evenly
    spread (manifests are grouped by class), always the same for the same split."""
    return np.unique(np.linspace(0, count - 1, min(sample, count)).round().astype(int))


def verify_deployed_model(model_uri: str, trimmed: Path, split: Split, expected: np.ndarray,
                          precision_policy: str, variant: str) -> float:
    """Run the logged model ``model_uri`` through the loader ``foodtransfer predict`` and
    ``serve`` use on a fixed sample of ``split``'s images (uint8, as decoded) and compare its
    probabilities with ``expected`` (the ones the metrics came from, one row per image of
    the split). Returns the largest difference; raises :class:`DeployedModelError` beyond
    the tolerance of ``precision_policy``."""
    import logging
    import time

    from foodtransfer.data.datasets import image_store
    from foodtransfer.predict import load_model, probabilities

    started = time.perf_counter()
    positions = verification_indices(len(split))
    images = image_store(trimmed, split).read(split.indices[positions])
    served = probabilities(load_model(model_uri), images).to_numpy(dtype="float64")
    drift = float(np.max(np.abs(served - expected[positions])))
    tolerance = VERIFY_TOLERANCE.get(precision_policy, VERIFY_TOLERANCE["mixed_float16"])
    if not drift <= tolerance:  # NaN fails too
        raise DeployedModelError(
            f"the {variant} model logged to MLflow ({model_uri}) is not the model that was "
            f"evaluated: on {len(positions)} validation images its probabilities differ from "
            f"the ones the metrics came from by up to {drift:.3g} (tolerance {tolerance:g} in "
            f"{precision_policy}). Its image preprocessing (crop, flip, scaling) or weights "
            "differ from the evaluated path's: nothing was published; fix the model code and "
            f"re-run 'dvc repro {variant}'.")
    logging.getLogger(__name__).info(
        "deployed-model check: the logged model gives the evaluated probabilities on %d "
        "validation images (largest difference %.2g) [%.1fs]", len(positions), drift,
        time.perf_counter() - started)
    return drift


@contextlib.contextmanager
def staged_outputs(paths: VariantPaths) -> Iterator[VariantPaths]:
    """Stand-ins for a variant's outputs, published (each renamed onto its path) only when
    the block succeeds: open it outside the variant's MLflow run, so that the outputs land
    after the run ended FINISHED and never name a run that failed."""
    from foodtransfer.tracking.runs import mark_published

    with staged([paths.metrics, paths.plots, paths.artifacts, paths.model]) as stand_ins:
        yield VariantPaths(*stand_ins)
    # Landed: the run they name says so (a kill before this leaves it "pending", and the
    # next run of a stage on this host marks it "lost").
    mark_published(json.loads((paths.artifacts / "mlflow_run.json").read_text())["run_id"])


def summary(metrics: dict[str, Any], history: History) -> str:
    """The stage's one-line summary (the stage runner puts the stage's name in front)."""
    return (f"test accuracy {metrics['test_accuracy']:.3f}, top-5 "
            f"{metrics['test_top5_accuracy']:.3f}, macro F1 {metrics['test_macro_f1']:.3f}; "
            f"{history.epochs_run} epochs (kept {history.best_epoch()}, by "
            f"{history.keep_epoch}), "
            f"{history.seconds_per_epoch:.2f} s/epoch")


@contextlib.contextmanager
def variant_run(params: Params, variant: str, split_dir: Path, setup: TrainingSetup,
                tags: dict[str, str] | None = None) -> Iterator[Any]:
    """The MLflow run of ``variant`` (see :func:`foodtransfer.tracking.runs.tracked_run`): the
    full params, the data version, the training setup and ``tags`` as tags, the split
    manifests as its datasets, and the machine's load as system metrics."""
    from foodtransfer.tracking.runs import tracked_run

    version = data_version(split_dir)
    with tracked_run(params.mlflow.experiment, variant, "variant", flatten(params),
                     {"variant": variant, "data_version": version, **setup.tags(),
                      **(tags or {})}, system_metrics=True, stages=[variant]) as run:
        run.log_split_manifests(split_dir, version)
        yield run


def finish_image_model(variant: str, model, history: History, trimmed: Path,
                       splits: dict[str, Split], class_names: list[str], run,
                       paths: VariantPaths, extra: dict[str, Any], what: str,
                       curve_rows: list[dict[str, float]] | None = None,
                       probabilities: dict[str, np.ndarray] | None = None,
                       precision_policy: str = "float32", head=None) -> str:
    """Evaluate an image model (raw images in) on validation and test, write and log its
    results, save and log it, and check the logged model against the evaluated one
    (:func:`verify_deployed_model`); returns the stage's summary line. ``probabilities``: the model's
    test and validation probabilities where the caller has them already (from cached frozen
    bottom outputs), instead of passes over the images; ``head``: the trained head the image
    model ends with, saved beside it."""
    from foodtransfer.models.classifiers import parameter_counts
    from foodtransfer.models.inference import compile_forward, predict_split

    if probabilities is None:
        forward = compile_forward(model)
        test_probs = predict_split(forward, trimmed, splits["test"])
        val_probs = predict_split(forward, trimmed, splits["val"])
    else:
        test_probs, val_probs = probabilities["test"], probabilities["val"]
    test = evaluate(test_probs, splits["test"].labels, class_names, intervals=True)
    validation = evaluate(val_probs, splits["val"].labels, class_names, prefix="best_val_")
    total, trainable = parameter_counts(model)
    model_uri = save_model(model, class_names, paths, run,
                           example_images(trimmed, splits["val"]), head=head)
    drift = verify_deployed_model(model_uri, trimmed, splits["val"], val_probs,
                                  precision_policy, variant)
    metrics = write_results(variant, paths, class_names, run, history=history, test=test,
                            validation=validation,
                            probabilities={"test": test_probs, "val": val_probs},
                            splits=splits, curve_rows=curve_rows, what=what,
                            extra={**extra, "total_params": total,
                                   "trainable_params": trainable,
                                   "deployed_model_drift": drift})
    return summary(metrics, history)
