"""Reading the split manifests, the decoded image stores and the cached features.

Images stream from the stores in batches through ``tf.data`` (parallel reads, prefetch), so the
dataset is never held in memory and reading overlaps with compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from foodtransfer.errors import DataError
from foodtransfer.images import ImageStore
from foodtransfer.split import SPLIT_NAMES


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
    return json.loads((trimmed_dir / "classes.json").read_text())


def load_split(split_dir: Path, name: str) -> Split:
    path = split_dir / f"{name}.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing: run 'dvc repro split' first.")
    frame = pd.read_csv(path)
    return Split(name, tuple(frame["store"]), frame["index"].to_numpy(np.int64),
                 frame["label"].to_numpy(np.int64), tuple(frame["image_id"]))


def load_splits(split_dir: Path) -> dict[str, Split]:
    return {name: load_split(split_dir, name) for name in SPLIT_NAMES}


def iter_split_images(trimmed_dir: Path, split: Split, batch_size: int):
    """Yield uint8 image batches of ``split`` in manifest order (one store per split)."""
    stores = set(split.stores)
    if len(stores) != 1:
        raise DataError(f"split {split.name} mixes image stores {sorted(stores)}")
    store = ImageStore(trimmed_dir / f"{stores.pop()}.npy")
    yield from store.batches(split.indices, batch_size)


def image_dataset(trimmed_dir: Path, split: Split, batch_size: int, *, shuffle: bool = False,
                  seed: int = 0, with_labels: bool = True, fixed_batches: bool = False):
    """A ``tf.data.Dataset`` of (float32 images 0..255, labels) batches read from the store.

    ``fixed_batches``: yield (uint8 images, count) batches all of exactly ``batch_size`` rows,
    the last one zero-padded after its ``count`` real images, so that a compiled forward pass
    is traced once for one input shape (and the cast to float happens on the device)."""
    import tensorflow as tf

    stores = set(split.stores)
    if len(stores) != 1:
        raise DataError(f"split {split.name} mixes image stores {sorted(stores)}")
    store = ImageStore(trimmed_dir / f"{stores.pop()}.npy")
    height, width, channels = store.shape[1:]

    def read(indices: np.ndarray) -> np.ndarray:
        return store.read(indices)

    def read_padded(indices: np.ndarray) -> np.ndarray:
        return store.read(indices, rows=batch_size)

    ds = tf.data.Dataset.from_tensor_slices((split.indices, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def load(indices, labels):
        images = tf.numpy_function(read, [indices], tf.uint8, stateful=False)
        images = tf.ensure_shape(images, (None, height, width, channels))
        images = tf.cast(images, tf.float32)
        return (images, labels) if with_labels else images

    def load_fixed(indices, labels):
        images = tf.numpy_function(read_padded, [indices], tf.uint8, stateful=False)
        images = tf.ensure_shape(images, (batch_size, height, width, channels))
        return images, tf.shape(indices)[0]

    if fixed_batches:
        # Bounded read-ahead (at most 4 batches in flight) instead of AUTOTUNE, whose buffers
        # grow with the run: memory stays flat whatever the number of images, and two
        # readers are plenty to keep up with a backbone pass per batch.
        ds = ds.map(load_fixed, num_parallel_calls=2, deterministic=True)
        return ds.prefetch(2)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def npy_dataset(path: Path, labels: np.ndarray, batch_size: int, *, shuffle: bool = False,
                seed: int = 0):
    """(rows, labels) batches of a .npy file read from disk through a memory map, batch by
    batch: memory does not grow with the file (bounded read-ahead of 2 batches)."""
    import tensorflow as tf

    rows = np.load(path, mmap_mode="r")
    if len(rows) != len(labels):
        raise DataError(f"{path} has {len(rows)} rows for {len(labels)} labels")

    def read(indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rows[indices])

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(labels)), labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def load(indices, batch_labels):
        x = tf.numpy_function(read, [indices], tf.as_dtype(rows.dtype), stateful=False)
        return tf.ensure_shape(x, (None, *rows.shape[1:])), batch_labels

    return ds.map(load, num_parallel_calls=2, deterministic=True).prefetch(2)


def load_features(features_dir: Path, name: str) -> np.ndarray:
    path = features_dir / f"{name}.npy"
    if not path.is_file():
        raise DataError(f"{path} is missing: run 'dvc repro features' first.")
    return np.load(path)
