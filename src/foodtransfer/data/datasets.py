"""Reading the decoded image stores and cached features as batches.

Rows stream from the ``.npy`` files in batches through ``tf.data`` (parallel reads, bounded
read-ahead), so a dataset is never held in memory and reading overlaps with compute. One
reader serves images and features alike (:func:`rows_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from foodtransfer.data.images import ImageStore, NpyRows
from foodtransfer.data.manifests import Split
from foodtransfer.errors import DataError


def image_store(trimmed_dir: Path, split: Split) -> ImageStore:
    """The decoded image store that holds ``split``'s images (one store per split)."""
    stores = set(split.stores)
    if len(stores) != 1:
        raise DataError(f"split {split.name} mixes image stores {sorted(stores)}")
    return ImageStore(trimmed_dir / f"{stores.pop()}.npy")


def example_images(trimmed_dir: Path, split: Split, count: int = 1) -> np.ndarray:
    """The first ``count`` images of ``split`` as float32 0..255 (a model's input example)."""
    return image_store(trimmed_dir, split).read(split.indices[:count]).astype("float32")


Transform = Callable[[np.ndarray, np.ndarray], np.ndarray]


def rows_dataset(rows: NpyRows, indices: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, fixed_batches: bool = False,
                 transform: Transform | None = None, shape: tuple[int, ...] | None = None):
    """A ``tf.data.Dataset`` of ``(rows[indices], labels)`` batches read from the .npy file.

    ``fixed_batches``: yield ``(rows, count)`` batches of exactly ``batch_size`` rows, the last
    one zero-padded after its ``count`` real rows, so that a compiled forward pass is traced
    once for one input shape. ``transform(batch, indices)`` (NumPy, in the reader threads)
    maps a batch of rows to a batch of ``shape`` rows of the same dtype (a crop, augmented
    views). Read-ahead is bounded (two readers, two batches in flight) instead of AUTOTUNE,
    whose buffers grow with the run: memory stays flat whatever the number of rows, and two
    readers keep up with a backbone pass per batch."""
    import tensorflow as tf

    shape = tuple(shape or rows.shape[1:])
    dtype = tf.as_dtype(rows.dtype)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(indices, np.int64), labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def read(batch_indices: np.ndarray, padded_to: int | None = None) -> np.ndarray:
        batch = rows.read(batch_indices, rows=padded_to)
        if transform is None:
            return batch
        padded = np.zeros(len(batch), np.int64)
        padded[:len(batch_indices)] = batch_indices
        return transform(batch, padded)

    def load(batch_indices, batch_labels):
        x = tf.numpy_function(read, [batch_indices], dtype, stateful=False)
        return tf.ensure_shape(x, (None, *shape)), batch_labels

    def load_fixed(batch_indices, batch_labels):
        x = tf.numpy_function(lambda i: read(i, batch_size), [batch_indices], dtype,
                              stateful=False)
        return tf.ensure_shape(x, (batch_size, *shape)), tf.shape(batch_indices)[0]

    ds = ds.map(load_fixed if fixed_batches else load, num_parallel_calls=2, deterministic=True)
    return ds.prefetch(2)


def image_dataset(trimmed_dir: Path, split: Split, batch_size: int, *, shuffle: bool = False,
                  seed: int = 0, with_labels: bool = True, fixed_batches: bool = False,
                  transform: Transform | None = None, size: int | None = None):
    """Batches of ``split``'s images: (float32 images 0..255, labels), or float32 images
    alone; with ``fixed_batches``, (uint8 images, count) as :func:`rows_dataset` gives them
    (the cast to float then happens on the device). ``transform`` (to ``size`` x ``size``
    images) is applied to each uint8 batch as it is read."""
    import tensorflow as tf

    ds = rows_dataset(image_store(trimmed_dir, split), split.indices, split.labels, batch_size,
                      shuffle=shuffle, seed=seed, fixed_batches=fixed_batches,
                      transform=transform, shape=(size, size, 3) if size else None)
    if fixed_batches:
        return ds
    if with_labels:
        return ds.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    return ds.map(lambda images, labels: tf.cast(images, tf.float32))


def npy_dataset(path: Path, labels: np.ndarray, batch_size: int, *, shuffle: bool = False,
                seed: int = 0):
    """(rows, labels) batches of a .npy file of one row per label, read from disk."""
    rows = NpyRows(path)
    if len(rows) != len(labels):
        raise DataError(f"{path} has {len(rows)} rows for {len(labels)} labels")
    return rows_dataset(rows, np.arange(len(labels)), labels, batch_size, shuffle=shuffle,
                        seed=seed)


def views_dataset(path: Path, labels: np.ndarray, batch_size: int, *, views: int, epochs: int,
                  seed: int = 0):
    """Batches for ``epochs`` epochs of a .npy file holding ``views + 1`` rows per label, view
    by view (view 0 first): epoch e reads view e mod (views + 1) of every image, shuffled
    (seeded). One dataset for all the epochs, one after the other (a training loop takes
    ``ceil(len(labels) / batch_size)`` batches per epoch from it)."""
    rows = NpyRows(path)
    images = len(labels)
    if len(rows) != images * (views + 1):
        raise DataError(f"{path} has {len(rows)} rows for {images} images x {views + 1} views")
    rng = np.random.default_rng(seed)
    dataset = None
    for epoch in range(epochs):
        order = rng.permutation(images)
        part = rows_dataset(rows, (epoch % (views + 1)) * images + order, labels[order],
                            batch_size)
        dataset = part if dataset is None else dataset.concatenate(part)
    return dataset


def load_features(features_dir: Path, name: str) -> np.ndarray:
    path = features_dir / f"{name}.npy"
    if not path.is_file():
        raise DataError(f"{path} is missing: the features stage did not write it with these "
                        "params. Run 'dvc repro features' first.")
    return np.load(path)
