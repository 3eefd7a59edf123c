"""The model registry: two registered models, so that who may train is not who may deploy.

- ``<mlflow.registered_model>-candidates``: every pipeline execution registers its winner here
  as a new version with its provenance. ``@challenger`` points at the winner of the latest
  DVC experiment (``dvc exp run``, queued or not), and on a team server at the latest
  execution's.
- ``<mlflow.registered_model>``, the production model: ``@champion`` is the model
  ``predict``, ``serve``, ``demo`` and ``export`` use by default. A version gets there only
  by promotion: a copy of a candidate version's files, logged in the experiment
  ``<mlflow.registered_model>-production`` and registered with the candidate's tags plus
  ``candidate_version`` and ``candidate_run_id``.

Who promotes: ``foodtransfer promote``, always. On the project's own store (one user) the
main workspace's ``dvc repro`` promotes its winner too, and so does the first execution of a
project without a champion. On a tracking server (http/https) only ``promote`` does: the
server's permissions then say who may (EDIT on the production model: docs/scale.md).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from foodtransfer.errors import TrackingError
from foodtransfer.tracking.store import retry_on_lock

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"


CANDIDATES_SUFFIX = "-candidates"
PRODUCTION_SUFFIX = "-production"  # the experiment holding the production model's files
CANDIDATE_TAG = "candidate_version"  # on a production version: the candidate it copies
CANDIDATE_RUN_TAG = "candidate_run_id"  # ... and the variant run that candidate came from
PIPELINE_RUN_TAG = "pipeline_run_id"  # on a version: the pipeline run that registered it
REPORT_FOLDER = "report"  # in a production version's run: its pipeline run's report
REPORT_ARTIFACTS = ("comparison.md", "errors.png")


def champion_uri(registered_model: str) -> str:
    """``models:/<registered_model>@champion``: what predict and serve use by default."""
    return f"models:/{registered_model}@{CHAMPION_ALIAS}"


def candidates_model(registered_model: str) -> str:
    """The registered model every execution registers its winner in."""
    return f"{registered_model}{CANDIDATES_SUFFIX}"


def in_experiment() -> bool:
    """Whether this execution is a DVC experiment (DVC sets DVC_EXP_NAME for ``dvc exp
    run``) rather than the main workspace's ``dvc repro``."""
    return bool(os.environ.get("DVC_EXP_NAME"))


def on_team_server() -> bool:
    from foodtransfer.tracking.store import is_http, tracking_uri

    return is_http(tracking_uri())


def promotes_itself(name: str, experiment: bool) -> bool:
    """Whether an execution promotes its own winner: never on a tracking server; on the
    project's own store, the main workspace's always and an experiment's when the
    production model has no champion yet (predict and serve then have a model)."""
    if on_team_server():
        return False
    return not experiment or version_by_alias(name, CHAMPION_ALIAS) is None


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


def settle_aliases(name: str, version: str, experiment: bool) -> list[str]:
    """After an execution registered ``version`` of the candidates model: point
    ``@challenger`` at it unless it is promoted, and promote it when
    :func:`promotes_itself`. Returns what moved, as ``<model> v<n> @<alias>``.

    On the project's own store the check and the moves hold the store's lock, so two
    experiments finishing at once (``dvc queue start -j 2``) cannot both find no champion:
    the first is promoted, the second is only the challenger."""
    from foodtransfer.tracking.store import alias_lock

    candidates = candidates_model(name)
    with alias_lock():
        promote = promotes_itself(name, experiment)
        moved = []
        if experiment or not promote:
            set_alias(candidates, CHALLENGER_ALIAS, version)
            moved.append(f"{candidates} v{version} @{CHALLENGER_ALIAS}")
        if promote:
            production = copy_to_production(name, version)
            moved.append(f"{name} v{production} @{CHAMPION_ALIAS}")
        return moved


def production_experiment(name: str) -> str:
    """The MLflow experiment that holds the production model's files: promotion writes them
    there, where only promoters may write (on a team server)."""
    return f"{name}{PRODUCTION_SUFFIX}"


def copy_to_production(name: str, candidate_version: str, create: bool = True) -> str:
    """Promote version ``candidate_version`` of the candidates model: rebuild its model in a
    run of the production experiment (:func:`production_experiment`, created when
    ``create``), register it as a new version of the production model ``name`` (created if
    need be) with the candidate's tags plus ``candidate_version`` and ``candidate_run_id``,
    copy its pipeline run's report beside it, and point ``@champion`` at it. Returns the new
    version. The candidate's files are writable by whoever may write its experiment, and its
    pickled pyfunc and code would run in ``serve``: only its Keras model (loaded in Keras' safe
    mode, which runs no code from the file) and its class names are taken; the pyfunc around
    them is this installation's (:func:`rebuild_model`). The caller holds the alias lock
    where there is one."""
    import io
    import tempfile

    import mlflow

    from foodtransfer.tracking.store import EXPERIMENT_TAGS, artifact_location, tracking_uri

    client = mlflow.MlflowClient()
    candidates = candidates_model(name)
    source = retry_on_lock(client.get_model_version)(candidates, str(candidate_version))
    experiment = production_experiment(name)
    found = retry_on_lock(client.get_experiment_by_name)(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    elif create:
        experiment_id = retry_on_lock(client.create_experiment)(
            experiment, artifact_location=artifact_location(tracking_uri()),
            tags={key: value for key, value in EXPERIMENT_TAGS.items()
                  if key == "mlflow.experimentKind"})
    else:
        raise TrackingError(
            f"there is no MLflow experiment {experiment!r} on {tracking_uri()}, where promotion "
            "keeps the production model's files: on a team server its admin creates it and "
            "grants promoters EDIT on it (docs/scale.md).")
    tags = {**source.tags, CANDIDATE_TAG: str(candidate_version),
            CANDIDATE_RUN_TAG: source.run_id}
    run = retry_on_lock(client.create_run)(
        experiment_id, run_name=f"promote {candidates} v{candidate_version}",
        tags={"run_kind": "promotion", CANDIDATE_TAG: str(candidate_version),
              CANDIDATE_RUN_TAG: source.run_id})
    run_id = run.info.run_id
    copied = None
    try:
        with tempfile.TemporaryDirectory(prefix="foodtransfer-promote-") as scratch:
            local = mlflow.artifacts.download_artifacts(
                f"models:/{candidates}/{candidate_version}", dst_path=scratch)
            with _in_run(run_id, experiment_id):
                model_uri = rebuild_model(Path(local))
            pipeline_run = source.tags.get(PIPELINE_RUN_TAG)
            if pipeline_run:
                for artifact in REPORT_ARTIFACTS:
                    with contextlib.suppress(Exception):  # a report is shown, not required
                        report = mlflow.artifacts.download_artifacts(
                            run_id=pipeline_run, artifact_path=artifact, dst_path=scratch)
                        retry_on_lock(client.log_artifact)(run_id, report, REPORT_FOLDER)
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow narrates the registration
            copied = retry_on_lock(mlflow.register_model)(model_uri, name, tags=tags)
        set_alias(name, CHAMPION_ALIAS, str(copied.version))
    except BaseException:
        # No version without the alias: a promotion happens whole or not at all. (On a team
        # server deleting a version needs MANAGE on the model: where the promoter has EDIT
        # only, the version stays, without the alias, and nothing loads it by default.)
        with contextlib.suppress(Exception):
            if copied is not None:
                client.delete_model_version(name, str(copied.version))
        with contextlib.suppress(Exception):
            retry_on_lock(client.set_terminated)(run_id, "FAILED")
        raise
    retry_on_lock(client.set_terminated)(run_id)
    return str(copied.version)


@contextlib.contextmanager
def _in_run(run_id: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent calls log to run ``run_id`` of experiment ``experiment_id`` for the
    block (nested in the active run, if any), then to what they logged to before."""
    import mlflow
    from mlflow.tracking import fluent

    # MLflow refuses to resume a run of another experiment than the active one: make it
    # active for the block, then put back what was there (no call to the store).
    previous = fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    fluent._active_experiment_id = experiment_id
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        with retry_on_lock(mlflow.start_run)(run_id=run_id,
                                             nested=mlflow.active_run() is not None):
            yield
    finally:
        fluent._active_experiment_id = previous[0]
        if previous[1] is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous[1]


def rebuild_model(local: Path) -> str:
    """Log to the active run a pyfunc made by this installation around the Keras model and
    the class names of the logged model in ``local`` (what MLflow downloaded), refusing a
    model whose Keras file asks to run code; returns the new model's URI."""
    import json

    import numpy as np
    import yaml

    from foodtransfer.tracking.models import KERAS_ARTIFACT, NAMES_ARTIFACT, log_model

    refused = ("the candidate's model is not what this pipeline logs ({}): it is not "
               "promoted.")
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        paths = {key: (local / (value["path"] if isinstance(value, dict) else value)).resolve()
                 for key, value in (flavor.get("artifacts") or {}).items()}
        keras_file, names_file = paths[KERAS_ARTIFACT], paths[NAMES_ARTIFACT]
        inside = local.resolve()
        if inside not in keras_file.parents or inside not in names_file.parents:
            raise ValueError("its artifacts point outside the model")  # a rewritten MLmodel
        class_names = json.loads(names_file.read_text())
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as error:
        raise TrackingError(refused.format(f"{type(error).__name__}: {error}")) from None
    if not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
        raise TrackingError(refused.format("its class names are not a list of names"))
    import keras

    import foodtransfer.models.classifiers  # noqa: F401  (registers the model's layers)

    try:
        model = keras.saving.load_model(keras_file, compile=False, safe_mode=True)
    except Exception as error:
        raise TrackingError(f"the candidate's Keras model does not load in Keras' safe mode "
                            f"({type(error).__name__}: {error}): it is not promoted.") from None
    try:
        side = int(model.input_shape[1])
    except (TypeError, IndexError):
        raise TrackingError(refused.format(f"input shape {model.input_shape}")) from None
    return log_model(keras_file, names_file, np.zeros((1, side, side, 3), np.uint8))


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
    DVC experiment name. A reference that matches several versions is refused (the tags are
    whatever the registering user wrote), one that matches none lists what there is."""
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
    if not reference.isdigit() and on_team_server():
        raise TrackingError(
            f"on a tracking server, name the version of '{name}' by its number (the DVC "
            f"experiment name and run ids are tags any user who may register can edit); "
            f"{reference!r} matches " + ", ".join(f"v{v.version}" for v in found) + ".")
    if len(found) > 1:  # tags anyone who may register can set: never guess which
        raise TrackingError(
            f"{len(found)} versions of '{name}' match {reference!r}: "
            f"{', '.join('v' + str(v.version) for v in found)}; name one by its number.")
    return found[0]
