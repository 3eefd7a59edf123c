"""Test-set evaluation: accuracy, top-5, macro F1, loss, per-class scores, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, f1_score


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    report_text: str
    predicted: np.ndarray


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(np.mean(-np.log(np.clip(picked, 1e-7, 1.0))))


def evaluate(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str],
             prefix: str = "test_") -> Evaluation:
    """Scores of ``probabilities`` (n, classes) against integer ``labels``."""
    predicted = probabilities.argmax(axis=1)
    all_labels = list(range(len(class_names)))
    metrics = {
        f"{prefix}accuracy": float(np.mean(predicted == labels)),
        f"{prefix}top5_accuracy": top_k_accuracy(probabilities, labels, 5),
        f"{prefix}macro_f1": float(f1_score(labels, predicted, labels=all_labels,
                                            average="macro", zero_division=0)),
        f"{prefix}loss": cross_entropy(probabilities, labels),
    }
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
