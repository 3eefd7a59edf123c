"""The split manifests (``data/split/{train,val,test}.csv``), the class names, and the data
version that names them: plain files, read without TensorFlow."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from foodtransfer.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    name: str
    stores: tuple[str, ...]  # store name of each row ("train" | "test")
    indices: np.ndarray  # row in that store
    labels: np.ndarray  # int labels
    image_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def load_classes(trimmed_dir: Path) -> list[str]:
    """The class names, in label order, that the trim stage wrote."""
    path = trimmed_dir / "classes.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: run 'dvc repro trim' first.")
    return json.loads(path.read_text())


def load_split(split_dir: Path, name: str) -> Split:
    path = split_dir / f"{name}.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing: run 'dvc repro split' first.")
    frame = pd.read_csv(path)
    return Split(name, tuple(frame["store"]), frame["index"].to_numpy(np.int64),
                 frame["label"].to_numpy(np.int64), tuple(frame["image_id"]))


def load_splits(split_dir: Path) -> dict[str, Split]:
    return {name: load_split(split_dir, name) for name in SPLIT_NAMES}


def data_version(split_dir: Path) -> str:
    """A short hash of the split manifests: the same data gives the same version anywhere."""
    digest = hashlib.sha256()
    for name in SPLIT_NAMES:
        digest.update((split_dir / f"{name}.csv").read_bytes())
    return digest.hexdigest()[:12]
