"""The training loop every variant shares: optimizer and schedule, the one place a classifier
is compiled, early stopping, per-epoch history and timing."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import keras

from foodtransfer.training import hyperrule
from foodtransfer.training.hyperrule import KEEP_RULES, KEEP_WHY, kept_row, score_epoch

log = logging.getLogger(__name__)


@dataclass
class History:
    """Per-epoch curves of one training run (epochs are 1-based, continuing ``first_epoch``)
    and the rule that chose the epoch whose weights were kept."""

    rows: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    keep_epoch: str = "val_accuracy"

    @property
    def epochs_run(self) -> int:
        return len(self.rows)

    def best_epoch(self) -> int:
        """The epoch (numbering as in rows) whose weights were kept, by ``keep_epoch``."""
        row = kept_row(self.rows, self.keep_epoch)
        return int(row["epoch"]) if row else 0

    def kept_line(self) -> str:
        """``kept the weights of epoch 8 of 10: the best validation accuracy (...)``."""
        row = kept_row(self.rows, self.keep_epoch)
        if row is None:
            return "no epoch trained"
        return (f"kept the weights of epoch {int(row['epoch'])} of "
                f"{int(self.rows[-1]['epoch'])}: {KEEP_WHY[self.keep_epoch]} (val_accuracy "
                f"{row.get('val_accuracy', math.nan):.3f}, val_loss "
                f"{row.get('val_loss', math.nan):.4f})")

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else 0.0


class KeepEpoch(keras.callbacks.Callback):
    """Early stopping and best-weights restoring by one rule (:data:`KEEP_RULES`): stops
    after ``patience`` epochs without a better one and puts back the kept epoch's weights at
    the end; with ``last``, neither."""

    def __init__(self, rule: str, patience: int) -> None:
        super().__init__()
        if rule not in KEEP_RULES:
            raise ValueError(f"keep_epoch {rule!r}: use one of {', '.join(KEEP_RULES)}")
        self.rule, self.patience = rule, patience
        self.best: tuple[float, ...] | None = None
        self.best_weights = None
        self.wait = 0
        self.stopped_epoch = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.best, self.best_weights, self.wait, self.stopped_epoch = None, None, 0, 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.rule == "last":
            return
        score = score_epoch({key: float(value) for key, value in (logs or {}).items()}, self.rule)
        if self.best is None or score > self.best:
            self.best, self.wait = score, 0
            self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class EpochRecorder(keras.callbacks.Callback):
    """Records each epoch's logs and wall time, forwards them to ``on_epoch`` (MLflow), and
    says how training goes: one log line per epoch (with an ETA), and at the end which epoch's
    weights were kept and whether early stopping ended it."""

    def __init__(self, history: History, first_epoch: int = 1, on_epoch=None,
                 early_stopping: KeepEpoch | None = None) -> None:
        super().__init__()
        self.history = history
        self.first_epoch = first_epoch
        self.on_epoch = on_epoch
        self.early_stopping = early_stopping
        self._started = 0.0
        self._learning_rate = 0.0

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
        log.info(epoch_line(row, epoch + 1, int(self.params.get("epochs") or epoch + 1),
                            self.history.epoch_seconds))
        if self.on_epoch is not None:
            self.on_epoch(row)

    def on_train_end(self, logs: dict | None = None) -> None:
        if not self.history.rows:
            return
        stopper = self.early_stopping
        if stopper is not None and stopper.stopped_epoch > 0:
            log.info("early stopping after epoch %d: %s did not improve for %d epochs",
                     self.first_epoch + stopper.stopped_epoch - 1, stopper.rule,
                     stopper.patience)
        log.info(self.history.kept_line())


def epoch_line(row: dict[str, float], done: int, planned: int,
               seconds: list[float]) -> str:
    """``epoch 3/100 (12 overall): loss 0.512, accuracy 0.830, val_loss 0.610, val_accuracy
    0.790, lr 0.001, 0.12 s/epoch, ETA <= 12 s``: the ETA is an upper bound, as early
    stopping may end training sooner."""
    from foodtransfer.progress import duration

    overall = f" ({int(row['epoch'])} overall)" if int(row["epoch"]) != done else ""
    shown = {"loss": "loss", "accuracy": "accuracy", "val_loss": "val_loss",
             "val_accuracy": "val_accuracy", "learning_rate": "lr"}
    values = ", ".join(f"{label} {row[key]:.3g}" if key == "learning_rate" else
                       f"{label} {row[key]:.3f}" for key, label in shown.items() if key in row)
    mean = sum(seconds) / len(seconds)
    eta = f", ETA <= {duration(mean * (planned - done))}" if done < planned else ""
    return f"epoch {done}/{planned}{overall}: {values}, {mean:.2f} s/epoch{eta}"


OPTIMIZERS = {"nadam": keras.optimizers.Nadam, "adam": keras.optimizers.Adam,
              "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}


def make_optimizer(name: str, learning_rate: float, *, schedule: str = "none", epochs: int = 1,
                   steps_per_epoch: int = 1) -> keras.optimizers.Optimizer:
    """Optimizer ``name`` at ``learning_rate``; with ``schedule="cosine"`` the rate decays to
    zero over the run (``plateau`` is a callback, see :func:`fit`)."""
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=hyperrule.cosine_decay_steps(epochs, steps_per_epoch))
    return OPTIMIZERS[name](learning_rate=rate)


@keras.saving.register_keras_serializable(package="foodtransfer")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy against integer labels smoothed towards the uniform distribution
    (Keras' sparse cross-entropy has no label smoothing)."""

    def __init__(self, num_classes: int, label_smoothing: float,
                 name: str = "smoothed_sparse_crossentropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return keras.losses.categorical_crossentropy(
            keras.ops.one_hot(labels, self.num_classes), y_pred,
            label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing}


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                       num_classes: int, label_smoothing: float = 0.0) -> None:
    """Cross-entropy on the softmax output (labels smoothed by ``label_smoothing``),
    accuracy and top-5 accuracy."""
    model.compile(
        optimizer=optimizer,
        loss=(SmoothedSparseCrossentropy(num_classes, label_smoothing) if label_smoothing
              else "sparse_categorical_crossentropy"),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
    )


def array_dataset(x, y, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """In-memory arrays as a tf.data pipeline (seeded reshuffle each epoch)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit(model: keras.Model, train: Any, validation: Any, *, epochs: int, learning_rate: float,
        optimizer: str, lr_schedule: str, patience: int, num_classes: int, batch_size: int,
        train_examples: int, first_epoch: int = 1, on_epoch=None, seed: int = 0,
        label_smoothing: float = 0.0, dataset_spans_epochs: bool = False,
        keep_epoch: str = "val_accuracy") -> History:
    """Compile ``model`` (the only place a classifier is compiled) and train it, keeping the
    weights of the epoch ``keep_epoch`` chooses (:data:`KEEP_RULES`), with early stopping by
    the same rule after ``patience`` epochs (none with ``last``). ``train``/``validation`` are tf.data
    datasets of ``batch_size`` batches, or in-memory ``(x, y)`` tuples;
    ``dataset_spans_epochs``: ``train`` holds every epoch's batches one after the other (a
    different augmented view per epoch), each epoch taking its share."""
    steps = hyperrule.steps_per_epoch(train_examples, batch_size)
    compile_classifier(model, make_optimizer(optimizer, learning_rate, schedule=lr_schedule,
                                             epochs=epochs, steps_per_epoch=steps), num_classes,
                       label_smoothing)
    history = History(keep_epoch=keep_epoch)
    stopper = KeepEpoch(keep_epoch, patience)
    callbacks: list[keras.callbacks.Callback] = [
        EpochRecorder(history, first_epoch, on_epoch, stopper), stopper]
    if lr_schedule == "plateau":
        callbacks.insert(0, keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=hyperrule.PLATEAU_FACTOR,
            patience=hyperrule.plateau_patience(patience), min_lr=hyperrule.PLATEAU_MIN_LR))
    if isinstance(train, tuple):
        train = array_dataset(*train, batch_size, shuffle=True, seed=seed)
        validation = array_dataset(*validation, batch_size)
    model.fit(train, validation_data=validation, epochs=epochs, callbacks=callbacks,
              shuffle=False, verbose=0, steps_per_epoch=steps if dataset_spans_epochs else None)
    return history
