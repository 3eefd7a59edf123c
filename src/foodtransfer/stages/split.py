"""Stage ``split``: a stratified, seeded train/validation split of the trimmed train images;
the official test images stay the held-out test set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from foodtransfer.atomic import atomic_dir, write_text
from foodtransfer.config import Params
from foodtransfer.data.manifests import data_version
from foodtransfer.errors import DataError


def split(trimmed_dir: Path, out_dir: Path, metrics_path: Path, *, val_fraction: float,
          seed: int) -> dict[str, dict[str, int]]:
    """Write ``out_dir/{train,val,test}.csv`` (rows point into the trimmed stores) and class
    counts per split to ``metrics_path``."""
    pool = pd.read_csv(trimmed_dir / "train.csv").assign(store="train")
    test = pd.read_csv(trimmed_dir / "test.csv").assign(store="test")
    per_class = pool["label"].value_counts()
    n_val = math.ceil(val_fraction * len(pool))  # as train_test_split counts it
    if (per_class < 2).any() or min(n_val, len(pool) - n_val) < per_class.size:
        raise DataError(
            f"data.val_fraction = {val_fraction} leaves some class without a training or "
            f"validation image ({len(pool)} train images, {per_class.size} classes). Raise "
            "data.samples_per_class, or move data.val_fraction towards 0.5."
        )
    train, val = train_test_split(pool, test_size=val_fraction, random_state=seed,
                                  stratify=pool["label"])
    frames = {"train": train.sort_values("index"), "val": val.sort_values("index"), "test": test}
    counts = {name: {str(k): int(v) for k, v in frame["class_name"].value_counts()
                     .sort_index().items()} for name, frame in frames.items()}
    with atomic_dir(out_dir) as tmp:
        for name, frame in frames.items():
            frame[["store", "index", "image_id", "class_name", "label"]].to_csv(
                tmp / f"{name}.csv", index=False)
        # Images per class and split: beside the manifests, not in the metrics file (DVC would
        # show each count as a column of dvc exp show).
        (tmp / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    summary = {f"{name}_images": int(len(frame)) for name, frame in frames.items()}
    summary["classes"] = int(per_class.size)
    write_text(metrics_path, json.dumps(summary, indent=2) + "\n")
    return counts


def run(params: Params, trimmed: Path, out: Path, metrics: Path) -> str:
    counts = split(trimmed, out, metrics, val_fraction=params.data.val_fraction,
                   seed=params.data.seed)
    sizes = ", ".join(f"{name} {sum(c.values())}" for name, c in counts.items())
    return f"{sizes} images; data version {data_version(out)}; manifests in {out}"
