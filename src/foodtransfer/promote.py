"""``foodtransfer promote VERSION|RUN_ID|EXP_NAME``: move ``@champion`` deliberately.

It resolves the version, compares it with the champion it replaces on the validation images
(paired: the difference in accuracy with its 95 % bootstrap interval and exact McNemar p; the
test set is never looked at for a choice), moves the alias and says what changed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from foodtransfer.evaluation import right_per_image
from foodtransfer.tracking.registry import (CHAMPION_ALIAS, resolve_version, set_alias,
                                            version_by_alias)
from foodtransfer.tracking.store import retry_on_lock

VALIDATION_PREDICTIONS = "val_predictions.csv"  # a variant run's artifact


def validation_predictions(version: Any) -> pd.DataFrame | None:
    """The per-image validation predictions of the run ``version`` was registered from."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = retry_on_lock(mlflow.artifacts.download_artifacts)(
                run_id=version.run_id, artifact_path=VALIDATION_PREDICTIONS, dst_path=folder)
        except Exception:  # an older run without them: compare without a paired test
            return None
        return pd.read_csv(Path(path))


def describe(version: Any) -> str:
    tags = version.tags
    where = f"DVC experiment {tags['dvc_exp_name']}" if tags.get("dvc_exp_name") else \
        "the main workspace"
    return (f"v{version.version} ({tags.get('variant', '?')} from {where}, validation "
            f"accuracy {tags.get('val_accuracy', tags.get('best_val_accuracy', '?'))})")


def paired_comparison(new: Any, old: Any) -> str:
    """A sentence comparing the two versions on the same validation images."""
    from foodtransfer.uncertainty import SIGNIFICANCE, paired_difference

    if new.tags.get("data_version") != old.tags.get("data_version"):
        return (f"no paired test: they were validated on different data (data version "
                f"{new.tags.get('data_version')} vs {old.tags.get('data_version')}).")
    new_predictions, old_predictions = validation_predictions(new), validation_predictions(old)
    if new_predictions is None or old_predictions is None:
        return "no paired test: a run lacks its validation predictions."
    right_new, right_old = right_per_image(new_predictions), right_per_image(old_predictions)
    if set(right_new.index) != set(right_old.index):
        return "no paired test: their validation images differ."
    diff = paired_difference(right_new.to_numpy(), right_old.loc[right_new.index].to_numpy())
    verdict = "significant" if diff.p_value < SIGNIFICANCE else "not significant"
    return (f"on the same {len(right_new)} validation images: {right_new.mean():.3f} vs "
            f"{right_old.mean():.3f}, difference {diff.difference * 100:+.1f} points "
            f"[{diff.ci_low * 100:+.1f}, {diff.ci_high * 100:+.1f}], McNemar p = "
            f"{diff.p_value:.3g} ({verdict} at the {SIGNIFICANCE:g} level).")


def promote(reference: str, registered_model: str) -> str:
    """Point ``@champion`` of ``registered_model`` at the version ``reference`` names;
    returns what it did, with the paired comparison against the champion it replaces."""
    new = resolve_version(registered_model, reference)
    old = version_by_alias(registered_model, CHAMPION_ALIAS)
    if old is not None and old.version == new.version:
        return f"{describe(new)} is already @{CHAMPION_ALIAS} of {registered_model}."
    comparison = paired_comparison(new, old) if old is not None else ""
    set_alias(registered_model, CHAMPION_ALIAS, new.version)
    if old is None:
        return f"@{CHAMPION_ALIAS} of {registered_model} -> {describe(new)} (there was none)."
    return (f"@{CHAMPION_ALIAS} of {registered_model} -> {describe(new)}, replacing "
            f"{describe(old)}; {comparison}")

