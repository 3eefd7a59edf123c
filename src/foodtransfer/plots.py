"""Every figure the pipeline draws: a variant's learning curves, confusion matrices (one or
side by side), all variants' curves on shared axes, and a grid of confident mistakes.

Figures are written atomically as PNG (Matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from foodtransfer.atomic import atomic_file  # noqa: E402




def save(figure: plt.Figure, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


KEPT_BY = {"val_accuracy": "best val accuracy", "val_loss": "lowest val loss",
           "last": "last epoch"}


def learning_curves(rows: list[dict[str, float]], best_epoch: int, title: str,
                    path: Path, keep_epoch: str | None = None) -> None:
    """Train vs validation loss and accuracy per epoch, the kept epoch marked (and the rule
    ``keep_epoch`` that kept it)."""
    epochs = [row["epoch"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, [row.get(metric, np.nan) for row in rows], label=f"train {metric}")
        axis.plot(epochs, [row.get(f"val_{metric}", np.nan) for row in rows],
                  label=f"validation {metric}")
        if best_epoch:
            why = f": {KEPT_BY[keep_epoch]}" if keep_epoch in KEPT_BY else ""
            axis.axvline(best_epoch, color="grey", linestyle="--",
                         label=f"kept epoch ({best_epoch}{why})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    save(figure, path)


def confusion_figure(panels: Sequence[tuple[np.ndarray, str]], class_names: list[str],
                     path: Path, title: str | None = None) -> None:
    """Confusion matrices ``(counts, panel title)`` side by side, class names on both axes
    (true down, predicted across), counts written in the cells up to 30 classes."""
    size = max(4.5, 0.42 * len(class_names) + 2)
    figure, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1, size),
                                squeeze=False, layout="constrained")
    for axis, (matrix, panel_title) in zip(axes[0], panels):
        image = axis.imshow(matrix, cmap="Blues")
        ticks = range(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=90, fontsize=8)
        axis.set_yticks(ticks, class_names, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        if len(class_names) <= 30:
            threshold = matrix.max() / 2 if matrix.size else 0
            for (row, column), value in np.ndenumerate(matrix):
                axis.text(column, row, str(value), ha="center", va="center", fontsize=7,
                          color="white" if value > threshold else "black")
        axis.set_title(panel_title)
        figure.colorbar(image, ax=axis, fraction=0.046)
    if title:
        figure.suptitle(title)
    save(figure, path)


def all_curves(histories: dict[str, pd.DataFrame], best_epochs: dict[str, int],
               path: Path, finetune_start: float | None = None,
               colors: dict[str, str] | None = None) -> None:
    """Train (dashed) and validation (solid) loss and accuracy of every variant on shared
    axes, stars at the kept epochs, a dotted line where fine-tuning starts."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for name, history in histories.items():
            if history.empty or "epoch" not in history:
                continue
            color = (colors or {}).get(name)
            epochs = history["epoch"].to_numpy(float)
            if metric in history:
                axis.plot(epochs, history[metric], linestyle="--", color=color, alpha=0.7,
                          label=f"{name} train")
            if f"val_{metric}" in history:
                axis.plot(epochs, history[f"val_{metric}"], color=color,
                          label=f"{name} validation")
                best = history[history["epoch"] == best_epochs.get(name)]
                if not best.empty:
                    axis.plot(best["epoch"], best[f"val_{metric}"], marker="*", markersize=13,
                              color=color, markeredgecolor="black", linestyle="none")
        if finetune_start is not None:
            axis.axvline(finetune_start, color="tab:green", linestyle=":", alpha=0.8)
            axis.annotate("fine-tune starts\n(from dropout's kept weights)",
                          (finetune_start, 0.0), xycoords=("data", "axes fraction"),
                          xytext=(4, 4), textcoords="offset points", va="bottom", fontsize=8)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(metric)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8,
                  bbox_to_anchor=(0.5, -0.1))
    figure.suptitle("Learning curves of all variants (train dashed, validation solid, "
                    "★ kept epoch)")
    save(figure, path)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], title: str, path: Path,
               empty_text: str = "nothing to show") -> None:
    """Images in a grid of up to four columns, each with its caption."""
    columns = 4 if len(images) > 4 else max(1, len(images))
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.3 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions):
        axis.imshow(image)
        axis.set_title(caption, fontsize=8)
    if not len(images):
        axes[0, 0].text(0.5, 0.5, empty_text, ha="center", va="center")
    figure.suptitle(title)
    save(figure, path)


def sweep_figure(frame: pd.DataFrame, swept: Sequence[str], path: Path,
                 metric: str = "test_accuracy", colors: dict[str, str] | None = None) -> None:
    """The mean ``metric`` over seeds against the swept params' values, ± one standard
    deviation as error bars, one line per variant. Numeric values of a single swept param
    are spaced as numbers; anything else is one tick per configuration."""
    labels = frame[list(swept)].astype(str).agg(", ".join, axis=1)
    numeric = len(swept) == 1 and pd.to_numeric(frame[swept[0]], errors="coerce").notna().all()
    if numeric:
        positions = pd.to_numeric(frame[swept[0]])
        ticks = sorted(set(positions))
        tick_labels = [f"{value:g}" for value in ticks]
    else:
        order = list(dict.fromkeys(labels))
        positions = labels.map({label: index for index, label in enumerate(order)})
        ticks, tick_labels = list(range(len(order))), order
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for variant, rows in frame.assign(_x=positions).groupby("variant", sort=False):
        rows = rows.sort_values("_x")
        axis.errorbar(rows["_x"], rows[f"{metric}_mean"], yerr=rows[f"{metric}_sd"].fillna(0),
                      marker="o", capsize=4, color=(colors or {}).get(variant), label=variant)
    axis.set_xticks(ticks, tick_labels, rotation=0 if numeric else 30)
    axis.set_xlabel(", ".join(swept))
    axis.set_ylabel(f"{metric.replace('_', ' ')} (mean ± sd over seeds)")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"{metric.replace('_', ' ')} against {', '.join(swept)}")
    save(figure, path)
