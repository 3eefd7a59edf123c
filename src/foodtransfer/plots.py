"""Figures for one variant: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402

from foodtransfer.atomic import atomic_file  # noqa: E402


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def learning_curves(rows: list[dict[str, float]], best_epoch: int, title: str,
                    path: Path) -> None:
    """Train vs validation loss and accuracy per epoch, the best epoch marked."""
    epochs = [row["epoch"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, [row.get(metric, np.nan) for row in rows], label=f"train {metric}")
        axis.plot(epochs, [row.get(f"val_{metric}", np.nan) for row in rows],
                  label=f"validation {metric}")
        if best_epoch:
            axis.axvline(best_epoch, color="grey", linestyle="--",
                         label=f"best epoch ({best_epoch})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    _save(figure, path)


def confusion(matrix: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    size = max(5.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=90)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, column), value in np.ndenumerate(matrix):
            axis.text(column, row, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > threshold else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title(title)
    _save(figure, path)
