"""Training loops shared by the variants: callbacks, schedules, history and timing."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import keras

from foodtransfer.models import compile_classifier, make_optimizer


@dataclass
class History:
    """Per-epoch curves of one training run (epochs are 1-based, continuing ``first_epoch``)."""

    rows: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def epochs_run(self) -> int:
        return len(self.rows)

    def best_epoch(self) -> int:
        """Epoch (numbering as in rows) with the lowest validation loss."""
        if not self.rows:
            return 0
        return int(min(self.rows, key=lambda row: row.get("val_loss", math.inf))["epoch"])

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else 0.0


class EpochRecorder(keras.callbacks.Callback):
    """Records each epoch's logs and wall time, and forwards them to ``on_epoch`` (MLflow)."""

    def __init__(self, history: History, first_epoch: int = 1, on_epoch=None) -> None:
        super().__init__()
        self.history = history
        self.first_epoch = first_epoch
        self.on_epoch = on_epoch
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()
        # The rate this epoch trains with (ReduceLROnPlateau changes it at epoch end).
        self._learning_rate = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._started
        row: dict[str, float] = {"epoch": self.first_epoch + epoch}
        for key, value in (logs or {}).items():
            row[key] = float(value)
        row["learning_rate"] = self._learning_rate
        self.history.rows.append(row)
        self.history.epoch_seconds.append(seconds)
        if self.on_epoch is not None:
            self.on_epoch(row)


def learning_rate_for(schedule: str, learning_rate: float, epochs: int, steps_per_epoch: int):
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate,
                                                      decay_steps=max(1, epochs * steps_per_epoch))
    return learning_rate


def fit(model: keras.Model, train: Any, validation: Any, *, epochs: int, learning_rate: float,
        optimizer: str, lr_schedule: str, patience: int, num_classes: int,
        steps_per_epoch: int, first_epoch: int = 1, on_epoch=None, batch_size: int | None = None,
        recompile: bool = True, seed: int = 0) -> History:
    """Compile ``model`` and train it with early stopping on validation loss (best weights
    restored). ``train``/``validation`` are tf.data datasets or (x, y) tuples."""
    if recompile:
        compile_classifier(
            model, make_optimizer(optimizer, learning_rate_for(lr_schedule, learning_rate,
                                                               epochs, steps_per_epoch)),
            num_classes)
    history = History()
    callbacks: list[keras.callbacks.Callback] = [
        EpochRecorder(history, first_epoch, on_epoch),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                      restore_best_weights=True),
    ]
    if lr_schedule == "plateau":
        callbacks.insert(0, keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.2, patience=max(1, patience // 3), min_lr=1e-6))
    if isinstance(train, tuple):
        train = array_dataset(*train, batch_size or 32, shuffle=True, seed=seed)
        validation = array_dataset(*validation, batch_size or 32)
    model.fit(train, validation_data=validation, epochs=epochs, callbacks=callbacks,
              shuffle=False, verbose=0)
    return history


def array_dataset(x, y, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """In-memory arrays as a tf.data pipeline (seeded reshuffle each epoch)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict_array(model: keras.Model, x, batch_size: int = 256):
    """Probabilities for in-memory inputs, batch by batch, without Keras' data adapters."""
    import numpy as np

    outputs = [keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=False))
               for start in range(0, len(x), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]))
