"""Training heuristics as small pure functions, shared by every stage that trains (after
big_transfer's ``bit_hyperrule.py``): batch sizes, steps, schedules, fine-tune learning rate.

Nothing here imports TensorFlow or reads params: each function maps numbers to numbers, so the
rules are unit-tested on their own and every trainer applies the same ones.
"""

from __future__ import annotations

import math

# The backbone's forward batch in the features stage and the fine-tune bottom cache. Fixed
# (not `batch_size`), so sweeping the training batch size re-extracts nothing.
FORWARD_BATCH = 32
# Rows of cached features (or frozen-bottom outputs) per call of a head: small rows, so large
# batches (the served model takes whole images, IMAGE_BATCH in tracking/models.py).
FEATURE_BATCH = 256

# ReduceLROnPlateau: divide the rate by 5 after a third of the early-stopping patience
# without improvement of the validation loss, down to this floor.
PLATEAU_FACTOR = 0.2
PLATEAU_MIN_LR = 1e-6


def steps_per_epoch(examples: int, batch_size: int) -> int:
    """Batches in one pass over ``examples`` (the last one may be partial)."""
    if examples < 0 or batch_size < 1:
        raise ValueError(f"need examples >= 0 and batch_size >= 1, got {examples}, {batch_size}")
    return math.ceil(examples / batch_size)


def plateau_patience(patience: int) -> int:
    """Epochs without improvement before ReduceLROnPlateau lowers the rate: a third of the
    early-stopping patience, so the rate drops (up to three times) before training stops."""
    return max(1, patience // 3)


def cosine_decay_steps(epochs: int, steps: int) -> int:
    """Steps over which a cosine schedule decays to zero: the whole run."""
    return max(1, epochs * steps)


def finetune_learning_rate(learning_rate: float, lr_scale: float) -> float:
    """Fine-tuning starts from trained weights: a fraction of the head's learning rate."""
    return learning_rate * lr_scale


# Which epoch's weights training keeps (param keep_epoch): the one validation says is best
# at what is reported (accuracy; ties: the lower validation loss), the lowest validation loss,
# or the last one (a fixed decaying schedule's end, no early stopping).
KEEP_RULES = ("val_accuracy", "val_loss", "last")
KEEP_WHY = {"val_accuracy": "the best validation accuracy (ties: the lower validation loss)",
            "val_loss": "the lowest validation loss",
            "last": "the last epoch (keep_epoch=last: no early stopping)"}


def score_epoch(row: dict[str, float], rule: str) -> tuple[float, ...]:
    """Larger is better: the order in which ``rule`` ranks epochs."""
    loss = row.get("val_loss", math.inf)
    loss = math.inf if math.isnan(loss) else loss
    if rule == "val_accuracy":
        accuracy = row.get("val_accuracy", -math.inf)
        return (-math.inf if math.isnan(accuracy) else accuracy, -loss)
    if rule == "val_loss":
        return (-loss,)
    return (row.get("epoch", 0),)


def kept_row(rows: list[dict[str, float]], rule: str) -> dict[str, float] | None:
    """The row of the epoch ``rule`` keeps (the earliest among equals)."""
    best = None
    for row in rows:
        if best is None or score_epoch(row, rule) > score_epoch(best, rule):
            best = row
    return best
