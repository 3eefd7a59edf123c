"""Everything MLflow: the store, one run per variant, params, per-epoch metrics, artifacts, model.

The default store is ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/artifacts``, where ``<project>`` is ``DVC_ROOT`` when DVC runs the stage (so
``dvc exp run`` in a temporary workspace still logs to the project's store) and the working
directory otherwise. ``MLFLOW_TRACKING_URI`` overrides it (a team's tracking server).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from foodtransfer.atomic import process_alive
from foodtransfer.errors import TrackingError

log = logging.getLogger(__name__)
T = TypeVar("T")


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def default_store_dir() -> Path:
    return project_root() / "mlruns"


def default_tracking_uri() -> str:
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def custom_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when it names another store than the project's own. (MLflow's
    set_tracking_uri also sets that variable, so it may hold our default.)"""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri != default_tracking_uri() else None


def tracking_uri() -> str:
    return custom_tracking_uri() or default_tracking_uri()


def _is_locked(error: BaseException) -> bool:
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text


def retry_on_lock(function: Callable[..., T], attempts: int = 12) -> Callable[..., T]:
    """Retry an MLflow call that failed on SQLite's writer lock (parallel `dvc queue` runs)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(attempts):
            try:
                return function(*args, **kwargs)
            except Exception as error:  # MLflow wraps sqlite3.OperationalError variously
                if not _is_locked(error) or attempt == attempts - 1:
                    raise
                time.sleep(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper


def _check_default_store(store: Path) -> None:
    try:
        store.mkdir(parents=True, exist_ok=True)
        probe = store / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        database = store / "mlflow.db"
        if database.exists():
            with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
    except (OSError, sqlite3.Error) as error:
        if isinstance(error, sqlite3.OperationalError) and _is_locked(error):
            return  # another writer holds it right now: that is not a broken store
        raise TrackingError(
            f"The MLflow store {store} is not writable ({error}). Fix its permissions, free "
            "disk space, or set MLFLOW_TRACKING_URI to a tracking server you can write to."
        ) from error


# For the check in connect() only: one try, with a short timeout, instead of MLflow's default
# of 7 retries with exponential backoff, which takes minutes to report an unreachable server.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _fail_fast_http(uri: str) -> Iterator[None]:
    """While connect() checks a tracking server, let MLflow try each request once (unless the
    user set these variables); later logging keeps MLflow's retries for passing outages."""
    added = [name for name in FAIL_FAST_HTTP if name not in os.environ]
    if uri.startswith(("http://", "https://")):
        for name in added:
            os.environ[name] = FAIL_FAST_HTTP[name]
    try:
        yield
    finally:
        if uri.startswith(("http://", "https://")):
            for name in added:
                os.environ.pop(name, None)


@contextlib.contextmanager
def _store_lock(store: Path, timeout: float = 300.0) -> Iterator[None]:
    """Hold an exclusive lock on the project's store while connect() opens it.

    Opening a fresh SQLite store creates its schema (alembic migrations): two stages doing it
    at once (``dvc queue start -j 2`` on a new store) collide ("table _alembic_tmp_tags already
    exists", "Online migration expected to match one row"). Under this lock the first creates
    the schema and the experiment and the others find them. The OS drops the lock when its
    holder dies, even by SIGKILL."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (parallel runs there need an existing store)
        yield
        return
    with open(store / ".connect.lock", "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"Another process has held the MLflow store lock {handle.name} for "
                        f"{timeout:.0f} s: is a stage hanging? Stop it and run again."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect(experiment: str) -> str:
    """Point MLflow at the store and the experiment, failing fast (before any training) when
    the store cannot be reached or written. Returns the experiment id."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    custom = custom_tracking_uri() is not None
    if not custom:
        _check_default_store(default_store_dir())
    mlflow.set_tracking_uri(uri)
    lock = contextlib.nullcontext() if custom else _store_lock(default_store_dir())
    try:
        with _fail_fast_http(uri), lock:
            client = mlflow.MlflowClient()
            found = retry_on_lock(client.get_experiment_by_name)(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                location = None
                if not custom:
                    location = (default_store_dir() / "artifacts").as_uri()
                try:
                    experiment_id = retry_on_lock(client.create_experiment)(
                        experiment, artifact_location=location)
                except Exception:  # created meanwhile by a parallel run
                    found = retry_on_lock(client.get_experiment_by_name)(experiment)
                    if found is None:
                        raise
                    experiment_id = found.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
            return experiment_id
    except TrackingError:
        raise
    except Exception as error:
        raise TrackingError(
            f"Cannot use the MLflow tracking store {uri} ({type(error).__name__}: {error}). "
            "Check MLFLOW_TRACKING_URI (unset it to use the project's mlruns/ store), the "
            "server, and the permissions of mlruns/."
        ) from error


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide MLflow's advice that does not apply here (type hints for predict, cloudpickle of a
    class that holds no state); its errors still show."""
    import warnings

    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def git_commit(root: Path) -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pip_requirements() -> list[str]:
    """The logged model's requirements, pinned to what is installed. Given explicitly, so that
    MLflow does not infer them by loading the model in a subprocess (tens of seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for distribution in ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "numpy", "pandas",
                         "pillow"):
        try:
            pinned.append(f"{distribution}=={version(distribution)}")
        except PackageNotFoundError:
            continue
    return pinned


class VariantRun:
    """Logging for one variant's MLflow run; every call retries on SQLite's lock."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_epoch(self, row: dict[str, float]) -> None:
        import mlflow

        step = int(row["epoch"])
        values = {key: float(value) for key, value in row.items() if key != "epoch"}
        retry_on_lock(mlflow.log_metrics)(values, step=step)

    def log_metrics(self, values: dict[str, float]) -> None:
        import mlflow

        retry_on_lock(mlflow.log_metrics)({k: float(v) for k, v in values.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        retry_on_lock(mlflow.log_artifact)(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        retry_on_lock(mlflow.set_tags)(tags)

    def log_model(self, model_path: Path, class_names_path: Path, example: Any) -> str:
        """Log the saved Keras model as a pyfunc (raw RGB 0..255 in, a DataFrame of class
        probabilities out) with its signature and an input example; returns the model URI."""
        import mlflow
        import numpy as np
        import pandas as pd
        from mlflow.models import infer_signature

        import foodtransfer

        with _quiet_mlflow():
            from foodtransfer.pyfunc_model import ImageClassifierModel
        # The output schema is known without running the model: one float32 column per class.
        class_names = json.loads(Path(class_names_path).read_text())
        output = pd.DataFrame(np.full((len(example), len(class_names)), 1 / len(class_names),
                                      dtype="float32"), columns=class_names)
        signature = infer_signature(example, output)
        with _quiet_mlflow():
            info = retry_on_lock(mlflow.pyfunc.log_model)(
                name="model", python_model=ImageClassifierModel(),  # unloaded: pickles small
                artifacts={"keras_model": str(model_path),
                           "class_names": str(class_names_path)},
                code_paths=[str(Path(foodtransfer.__file__).parent)],
                pip_requirements=pip_requirements(),
                signature=signature, input_example=example,
            )
        self.set_tags({"model_uri": info.model_uri})
        return info.model_uri


HOST_TAG, PID_TAG = "host", "pid"  # where a run's process runs: to find runs left RUNNING


def _process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """End as KILLED the runs of this experiment that are still RUNNING although the process
    that started them on this host is gone (SIGKILL, power loss: nothing could end them).
    Returns their ids. Runs of other hosts are left alone: their processes cannot be seen."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = retry_on_lock(client.search_runs)(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
        f"tags.{HOST_TAG} = '{socket.gethostname()}'", max_results=1000)
    ended = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            retry_on_lock(client.set_terminated)(run.info.run_id, status="KILLED")
            log.info("MLflow run %s (%s) marked killed: its process %s is gone",
                     run.info.run_id, run.info.run_name, pid)
            ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def variant_run(experiment: str, variant: str, params: dict[str, Any],
                tags: dict[str, str]) -> Iterator[VariantRun]:
    """Start the MLflow run of ``variant``; it ends FINISHED, or FAILED on any exception
    (SIGTERM included: stages turn it into an exception), never RUNNING forever. Runs that a
    killed process left RUNNING are ended as KILLED first (:func:`end_orphaned_runs`)."""
    import mlflow

    end_orphaned_runs(connect(experiment))
    root = project_root()
    all_tags = {"variant": variant, "data_version": tags.pop("data_version", "unknown"),
                **_process_tags()}
    commit = git_commit(root)
    if commit:
        all_tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    all_tags.update(tags)
    run = retry_on_lock(mlflow.start_run)(run_name=variant, tags=all_tags)
    status = "FAILED"
    try:
        retry_on_lock(mlflow.log_params)({k: ("null" if v is None else v)
                                          for k, v in params.items()})
        yield VariantRun(run.info.run_id)
        status = "FINISHED"
    finally:
        retry_on_lock(mlflow.end_run)(status=status)
        log.info("MLflow run %s (%s) %s in %s", run.info.run_id, variant, status.lower(),
                 tracking_uri())


# ------------------------------------------------------- pipeline runs, registry, the UI
PIPELINE_RUN_NAME = "pipeline"
PIPELINE_TAG = "pipeline_run_id"  # on a variant run: the pipeline run it belongs to
PARENT_TAG = "mlflow.parentRunId"  # MLflow's UI nests a run under the run this tag names


@contextlib.contextmanager
def pipeline_run(experiment: str, params: dict[str, Any],
                 tags: dict[str, str]) -> Iterator[VariantRun]:
    """Start the parent run of one pipeline execution (run name ``pipeline``, tag
    ``run_kind=pipeline``); it ends FINISHED, or FAILED on any exception. The yielded object
    logs to it like a variant run."""
    import mlflow

    end_orphaned_runs(connect(experiment))
    all_tags = {"run_kind": "pipeline", **tags, **_process_tags()}
    commit = git_commit(project_root())
    if commit:
        all_tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    run = retry_on_lock(mlflow.start_run)(run_name=PIPELINE_RUN_NAME, tags=all_tags)
    status = "FAILED"
    try:
        retry_on_lock(mlflow.log_params)({k: ("null" if v is None else v)
                                          for k, v in params.items()})
        yield VariantRun(run.info.run_id)
        status = "FINISHED"
    finally:
        retry_on_lock(mlflow.end_run)(status=status)
        log.info("MLflow run %s (%s) %s in %s", run.info.run_id, PIPELINE_RUN_NAME,
                 status.lower(), tracking_uri())


def get_variant_runs(run_ids: dict[str, str]) -> dict[str, Any]:
    """The finished MLflow runs (``mlflow.entities.Run``) of ``{variant: run_id}``, or a
    TrackingError saying which one is missing or unfinished and how to fix it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    runs = {}
    for variant, run_id in run_ids.items():
        try:
            run = retry_on_lock(client.get_run)(run_id)
        except MlflowException as error:
            raise TrackingError(
                f"The MLflow run {run_id} of variant '{variant}' (artifacts/{variant}/"
                f"mlflow_run.json) is not in the store {tracking_uri()} ({error.error_code}): "
                "the store was reset or MLFLOW_TRACKING_URI points elsewhere. Re-run the "
                f"variant with 'dvc repro --force {variant}'."
            ) from error
        if run.info.status != "FINISHED":
            raise TrackingError(
                f"The MLflow run {run_id} of variant '{variant}' is {run.info.status}, not "
                f"FINISHED: re-run it with 'dvc repro --force {variant}'.")
        if not run.data.tags.get("model_uri"):
            raise TrackingError(
                f"The MLflow run {run_id} of variant '{variant}' has no logged model (tag "
                f"model_uri): re-run it with 'dvc repro --force {variant}'.")
        runs[variant] = run
    return runs


def adopt_runs(parent_run_id: str, runs: dict[str, Any]) -> list[str]:
    """Nest the variant runs that no finished pipeline run owns yet under ``parent_run_id``
    (tags ``mlflow.parentRunId`` and ``pipeline_run_id``); returns the adopted variants.

    A variant run that DVC reused from an earlier execution stays under the pipeline run that
    trained it (a run has one parent); the new parent lists it in its tags and report."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    adopted = []
    for variant, run in runs.items():
        owner = run.data.tags.get(PIPELINE_TAG)
        if owner and owner != parent_run_id:
            try:
                if retry_on_lock(client.get_run)(owner).info.status == "FINISHED":
                    continue
            except MlflowException:
                pass  # the owner was deleted: adopt
        retry_on_lock(client.set_tag)(run.info.run_id, PARENT_TAG, parent_run_id)
        retry_on_lock(client.set_tag)(run.info.run_id, PIPELINE_TAG, parent_run_id)
        adopted.append(variant)
    return adopted


def register_model_version(model_uri: str, name: str, alias: str, run_id: str,
                           tags: dict[str, str], description: str | None = None) -> str:
    """Register ``model_uri`` under ``name`` (or reuse the version already registered from
    it) and point ``alias`` at it; returns the version number."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = [version for version in retry_on_lock(client.search_model_versions)(
                    f"name = '{name}'")
                if version.source == model_uri and version.run_id == run_id]
    if existing:
        version = existing[0]
        for key, value in tags.items():
            retry_on_lock(client.set_model_version_tag)(name, version.version, key, value)
    else:
        version = retry_on_lock(mlflow.register_model)(model_uri, name, tags=tags)
    if description:
        retry_on_lock(client.update_registered_model)(name, description=description)
    retry_on_lock(client.set_registered_model_alias)(name, alias, version.version)
    return str(version.version)


def ui_command(port: int, host: str = "127.0.0.1") -> tuple[list[str], str]:
    """The ``mlflow ui`` command line for this project's store, and the URL it serves.

    The project's store needs the explicit backend and artifact root (without them MLflow
    opens a fresh ``mlflow.db`` in the working directory); ``MLFLOW_TRACKING_URI`` names
    another database store. A tracking server (http/https) has its own UI: that URL is
    returned with an empty command."""
    import sys

    custom = custom_tracking_uri()
    if custom and custom.split("://", 1)[0].lower() in ("http", "https"):
        return [], custom
    command = [sys.executable, "-m", "mlflow", "ui"]
    if custom:
        command += ["--backend-store-uri", custom]
    else:
        store = default_store_dir()
        if not (store / "mlflow.db").is_file():
            raise TrackingError(
                f"There is no MLflow store at {store / 'mlflow.db'} yet: run the pipeline "
                "first (dvc repro), run this from the project root, or set "
                "MLFLOW_TRACKING_URI.")
        command += ["--backend-store-uri", default_tracking_uri(),
                    "--default-artifact-root", (store / "artifacts").as_uri()]
    command += ["--host", host, "--port", str(port)]
    return command, f"http://{host}:{port}"
