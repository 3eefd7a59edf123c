"""The model registry: every pipeline execution registers its winner as a new version with its
provenance; aliases say which version is in use.

- ``@champion``: the model ``predict``, ``serve`` and ``export`` use by default. ``dvc repro``
  in the main workspace moves it; so does ``foodtransfer promote``, deliberately.
- ``@challenger``: the winner of the latest DVC experiment (``dvc exp run``, queued or not):
  an exploratory sweep never replaces the champion by itself.
"""

from __future__ import annotations

import os
import re
from typing import Any

from foodtransfer.errors import TrackingError
from foodtransfer.tracking.store import retry_on_lock

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"


def champion_uri(registered_model: str) -> str:
    """``models:/<registered_model>@champion``: what predict and serve use by default."""
    return f"models:/{registered_model}@{CHAMPION_ALIAS}"


def execution_alias() -> str:
    """The alias this pipeline execution's winner gets: ``challenger`` inside a DVC
    experiment (DVC sets DVC_EXP_NAME for ``dvc exp run``), ``champion`` for ``dvc repro``."""
    return CHALLENGER_ALIAS if os.environ.get("DVC_EXP_NAME") else CHAMPION_ALIAS


def register_version(model_uri: str, name: str, tags: dict[str, str],
                     description: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` (the execution's
    provenance; a model another execution registered too gets a version of its own, with its
    own provenance); returns the version number. Moves no alias (:func:`set_alias` does, once
    the execution's reports are written)."""
    import mlflow

    version = retry_on_lock(mlflow.register_model)(model_uri, name, tags=tags)
    if description:
        retry_on_lock(mlflow.MlflowClient().update_registered_model)(name,
                                                                     description=description)
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    import mlflow

    retry_on_lock(mlflow.MlflowClient().set_registered_model_alias)(name, alias, version)


def move_aliases(name: str, alias: str, version: str) -> list[str]:
    """Point ``alias`` at ``version``; a challenger also becomes the champion when there is
    none yet (a first run that is an experiment: nothing is replaced, and predict and serve
    have a model). Returns the aliases moved.

    On the project's own store the check and the moves hold the store's lock, so two
    experiments finishing at once (``dvc queue start -j 2``) cannot both find no champion:
    the first makes its version the champion, the second only the challenger. (On a
    tracking server, MLflow offers no lock: the last move wins, and each alias still names
    a complete version.)"""
    from foodtransfer.tracking.store import alias_lock

    with alias_lock():
        set_alias(name, alias, version)
        if alias == CHALLENGER_ALIAS and version_by_alias(name, CHAMPION_ALIAS) is None:
            set_alias(name, CHAMPION_ALIAS, version)
            return [alias, CHAMPION_ALIAS]
        return [alias]


def registered_version(model_uri: str) -> str | None:
    """The registry version a ``models:/<name>@<alias>`` or ``models:/<name>/<n>`` URI
    names, else None."""
    import mlflow

    if not model_uri.startswith("models:/"):
        return None
    name_and_rest = model_uri[len("models:/"):]
    if "@" in name_and_rest:
        name, alias = name_and_rest.split("@", 1)
        version = retry_on_lock(mlflow.MlflowClient().get_model_version_by_alias)(name, alias)
        return str(version.version)
    name, _, version = name_and_rest.partition("/")
    return version if version.isdigit() else None


def version_by_alias(name: str, alias: str) -> Any | None:
    """The version of ``name`` that ``alias`` points at, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return retry_on_lock(mlflow.MlflowClient().get_model_version_by_alias)(name, alias)
    except MlflowException:
        return None


def resolve_version(name: str, reference: str) -> Any:
    """The version of ``name`` that ``reference`` names: a version number, the id of the
    MLflow run it came from (a variant run, or the pipeline run that registered it), or a
    DVC experiment name (its latest version). A TrackingError lists what there is."""
    import mlflow

    client = mlflow.MlflowClient()
    versions = retry_on_lock(client.search_model_versions)(f"name = '{name}'")
    if not versions:
        raise TrackingError(f"the registered model '{name}' has no versions: run the pipeline "
                            "first (dvc repro), or check mlflow.registered_model in params.")
    latest_first = sorted(versions, key=lambda version: int(version.version), reverse=True)
    if reference.isdigit():
        found = [v for v in latest_first if str(v.version) == reference]
    elif re.fullmatch(r"[0-9a-f]{32}", reference):
        found = [v for v in latest_first if reference in (
            v.run_id, v.tags.get("pipeline_run_id"))]
    else:
        found = [v for v in latest_first if v.tags.get("dvc_exp_name") == reference]
    if not found:
        known = ", ".join(f"v{v.version}" + (f" ({v.tags['dvc_exp_name']})"
                                             if v.tags.get("dvc_exp_name") else "")
                          for v in latest_first[:10])
        raise TrackingError(
            f"no version of '{name}' matches {reference!r} (a version number, an MLflow run "
            f"id or a DVC experiment name); latest versions: {known}.")
    return found[0]
