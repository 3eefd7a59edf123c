"""Scoring predictions: accuracy, top-5, macro F1, log loss, per-class scores, confusion
matrix (scikit-learn), and on the test set 95 % bootstrap intervals of the first three
(:mod:`foodtransfer.uncertainty`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (classification_report, confusion_matrix, f1_score, log_loss,
                             top_k_accuracy_score)

from foodtransfer.uncertainty import classification_intervals, top_k_hits


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    report_text: str
    predicted: np.ndarray


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` most probable (``k`` capped at the
    number of classes, where every row counts)."""
    classes = probabilities.shape[1]
    if k >= classes:
        return 1.0
    if classes == 2:  # scikit-learn takes the positive class's score in the binary case
        return float(top_k_accuracy_score(labels, probabilities[:, 1], k=k, labels=[0, 1]))
    return float(top_k_accuracy_score(labels, probabilities, k=k, labels=range(classes)))


def evaluate(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str],
             prefix: str = "test_", *, intervals: bool = False) -> Evaluation:
    """Scores of ``probabilities`` (n, classes) against integer ``labels``; with
    ``intervals``, also ``<metric>_ci_low`` / ``_ci_high`` (95 % percentile bootstrap) for
    accuracy, top-5 accuracy and macro F1."""
    predicted = probabilities.argmax(axis=1)
    # Softmax outputs sum to 1 up to float32 rounding, which log_loss refuses past its
    # tolerance: renormalise in float64.
    normalised = probabilities.astype("float64")
    normalised /= normalised.sum(axis=1, keepdims=True)
    all_labels = list(range(len(class_names)))
    metrics = {
        f"{prefix}accuracy": float(np.mean(predicted == labels)),
        f"{prefix}top5_accuracy": top_k_accuracy(probabilities, labels, 5),
        f"{prefix}macro_f1": float(f1_score(labels, predicted, labels=all_labels,
                                            average="macro", zero_division=0)),
        f"{prefix}loss": float(log_loss(labels, normalised, labels=all_labels)),
    }
    if intervals:
        bounds = classification_intervals(labels, predicted, top_k_hits(probabilities, labels, 5),
                                          len(class_names))
        for name, (low, high) in bounds.items():
            metrics[f"{prefix}{name}_ci_low"] = low
            metrics[f"{prefix}{name}_ci_high"] = high
    report = classification_report(labels, predicted, labels=all_labels,
                                   target_names=class_names, output_dict=True, zero_division=0)
    per_class = {name: {"precision": float(report[name]["precision"]),
                        "recall": float(report[name]["recall"]),
                        "f1": float(report[name]["f1-score"]),
                        "support": int(report[name]["support"])} for name in class_names}
    text = classification_report(labels, predicted, labels=all_labels, target_names=class_names,
                                 digits=3, zero_division=0)
    return Evaluation(metrics, per_class,
                      confusion_matrix(labels, predicted, labels=all_labels), text, predicted)


def right_per_image(predictions: pd.DataFrame) -> pd.Series:
    """Per image (the index: image ids), whether a predictions table (``image_id``,
    ``actual``, ``predicted``, as the variant stages write it) got it right."""
    frame = predictions.drop_duplicates("image_id").set_index("image_id")
    return frame["actual"].astype(str) == frame["predicted"].astype(str)
