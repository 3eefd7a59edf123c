"""``foodtransfer promote VERSION|RUN_ID|EXP_NAME``: move ``@champion`` deliberately.

It resolves the candidate version (of ``<mlflow.registered_model>-candidates``), compares it
with the champion it replaces on the validation images (paired: the difference in accuracy
with its 95 % bootstrap interval and exact McNemar p; the test set is never looked at for a
choice), copies it into the production model, points ``@champion`` at the copy and says what
changed. On a tracking server the server decides who may: EDIT on the production model and on
the experiment that holds its files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from foodtransfer.errors import TrackingError
from foodtransfer.evaluation import right_per_image
from foodtransfer.tracking.registry import (CANDIDATE_RUN_TAG, CANDIDATE_TAG, CHAMPION_ALIAS,
                                            candidates_model,
                                            copy_to_production, on_team_server,
                                            resolve_version, version_by_alias)
from foodtransfer.tracking.store import alias_lock, login_error, retry_on_lock, tracking_uri

VALIDATION_PREDICTIONS = "val_predictions.csv"  # a variant run's artifact


def validation_predictions(version: Any) -> pd.DataFrame | None:
    """The per-image validation predictions of the run ``version`` was registered from."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = retry_on_lock(mlflow.artifacts.download_artifacts)(
                run_id=version.tags.get(CANDIDATE_RUN_TAG) or version.run_id,
                artifact_path=VALIDATION_PREDICTIONS, dst_path=folder)
        except Exception:  # an older run without them: compare without a paired test
            return None
        return pd.read_csv(Path(path))


def describe(version: Any) -> str:
    tags = version.tags
    where = f"DVC experiment {tags['dvc_exp_name']}" if tags.get("dvc_exp_name") else \
        "the main workspace"
    copied = f", a copy of candidate v{tags[CANDIDATE_TAG]}" if tags.get(CANDIDATE_TAG) else ""
    return (f"{version.name} v{version.version} ({tags.get('variant', '?')} from {where}"
            f"{copied}, validation accuracy "
            f"{tags.get('val_accuracy', tags.get('best_val_accuracy', '?'))})")


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
    """Copy the candidate version ``reference`` names into the production model
    ``registered_model`` and point its ``@champion`` at the copy; returns what it did, with
    the paired comparison against the champion it replaces."""
    import mlflow

    new = resolve_version(candidates_model(registered_model), reference)
    old = version_by_alias(registered_model, CHAMPION_ALIAS)
    if old is not None and old.tags.get(CANDIDATE_TAG) == str(new.version):
        return (f"{describe(new)} is already @{CHAMPION_ALIAS} of {registered_model} "
                f"(v{old.version}).")
    team = on_team_server()
    if old is None and team and not _exists(registered_model):
        raise TrackingError(
            f"the production model {registered_model!r} does not exist on {tracking_uri()}: "
            "on a team server its admin creates it and grants promoters EDIT on it "
            "(docs/scale.md), so that promotion stays theirs.")
    comparison = paired_comparison(new, old) if old is not None else ""
    try:
        with alias_lock():  # on a team server nothing is created: the admin did
            production = copy_to_production(registered_model, str(new.version), create=not team)
    except mlflow.exceptions.MlflowException as error:
        problem = login_error(error, tracking_uri(),
                              f"promotion (a new version of {registered_model!r} and its "
                              f"@{CHAMPION_ALIAS}); @{CHAMPION_ALIAS} did not move")
        if problem is not None:
            raise problem from None
        raise
    moved = f"@{CHAMPION_ALIAS} of {registered_model} -> v{production}, a copy of {describe(new)}"
    if old is None:
        return f"{moved} (there was none)."
    return f"{moved}, replacing {describe(old)}; {comparison}"


def _exists(name: str) -> bool:
    import mlflow

    try:
        retry_on_lock(mlflow.MlflowClient().get_registered_model)(name)
        return True
    except mlflow.exceptions.MlflowException as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
