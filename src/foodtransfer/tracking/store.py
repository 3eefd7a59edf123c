"""The MLflow tracking store: where it is, opening it (fail fast, one creator at a time), retries.

The default store is ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/artifacts``, where ``<project>`` is ``DVC_ROOT`` when DVC runs the stage (so
``dvc exp run`` in a temporary workspace still logs to the project's store) and the working
directory otherwise. ``MLFLOW_TRACKING_URI`` overrides it (a team's tracking server).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from foodtransfer.errors import ServerLostError, TrackingError
from foodtransfer.tracking.uri import (  # noqa: F401 (where callers find them)
    _APPLIED, FAIL_FAST_HTTP, STAGE_HTTP, _fail_fast_http, check_login, custom_tracking_uri,
    default_store_dir, default_tracking_uri, is_http, login_error, project_root, tracking_uri)

log = logging.getLogger(__name__)
T = TypeVar("T")


def _is_locked(error: BaseException) -> bool:
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text


def retry_on_lock(function: Callable[..., T], attempts: int = 12) -> Callable[..., T]:
    """Retry an MLflow call that failed on SQLite's writer lock (parallel `dvc queue` runs);
    a tracking server that stopped answering becomes one clear TrackingError."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as error:
            if lost_server(error):
                raise ServerLostError(
                    f"The MLflow tracking server {tracking_uri()} stopped answering "
                    f"({type(error).__name__}). The stage stopped without writing its outputs; "
                    "start the server again and re-run it (dvc repro).") from error
            raise

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(attempts - 1):
            try:
                return call(*args, **kwargs)
            except Exception as error:  # MLflow wraps sqlite3.OperationalError variously
                if not _is_locked(error):
                    raise
                time.sleep(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        return call(*args, **kwargs)  # the last attempt: its error reaches the caller

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


# MLflow's UI opens an experiment without a kind on its GenAI traces view: mark ours as model
# training, so it opens on the runs.
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {
    KIND_TAG: "custom_model_development",
    # The experiment's description in the UI (markdown).
    "mlflow.note.content": (
        "foodtransfer: how much ImageNet transfer learning helps on Food-101 photographs. "
        "Each `pipeline` run is one execution of the DVC pipeline (its report, figures and "
        "paired tests); nested under it, one run per variant: `baseline` (a CNN from "
        "scratch), `transfer` (a head on the frozen ImageNet backbone), `dropout` (the head "
        "with dropout and L1/L2), `finetune` (the top of the backbone unfrozen). `comparison` "
        "runs aggregate seeds and sweeps (`foodtransfer compare`). Choices are made on "
        "validation accuracy; test metrics carry 95 % bootstrap intervals."),
}

LOST_SERVER_SIGNS = ("max retries exceeded", "connection refused", "connectionerror",
                     "failed to establish a new connection", "remotedisconnected",
                     "connection aborted", "read timed out", "connection reset")


def lost_server(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server does not answer (not: it refused a call)."""
    text = f"{type(error).__name__}: {error}".lower()
    return is_http(tracking_uri()) and any(sign in text for sign in LOST_SERVER_SIGNS)


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


def sqlite_folder(uri: str) -> Path | None:
    """The folder of a ``sqlite:///`` store's database (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if not database.is_absolute():
        database = Path.cwd() / database
    return database.resolve().parent


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """The lock of a SQLite store (``.connect.lock`` beside its database, whoever names it:
    the project, or a sweep's clone through MLFLOW_TRACKING_URI); none for a server."""
    folder = sqlite_folder(uri)
    if folder is None:
        return contextlib.nullcontext()
    folder.mkdir(parents=True, exist_ok=True)
    return _store_lock(folder)


def alias_lock() -> contextlib.AbstractContextManager:
    """The store's lock, for a read-then-move of registry aliases (a tracking server: none)."""
    return store_lock(tracking_uri())


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store ``uri`` keeps its artifacts: ``artifacts/`` beside
    a SQLite database (the project's own or another), None for a tracking server (the server
    decides). MLflow would otherwise make it relative to the creating process's working
    directory, fixed for good at creation: created from a sweep's temporary clone or a DVC
    queue's copy, every later run's artifacts would go to that folder and vanish with it."""
    folder = sqlite_folder(uri)
    return None if folder is None else (folder / "artifacts").as_uri()


def _check_artifact_location(location: str, experiment: str) -> None:
    """Say so when an experiment keeps its artifacts in a local folder that no longer exists
    under a parent that is gone too (created from a temporary copy by an older version)."""
    if not location.startswith("file://"):
        return
    folder = Path(location[len("file://"):])
    if not folder.exists() and not folder.parent.exists():
        log.warning("the MLflow experiment %r keeps its artifacts in %s, which no longer "
                    "exists (it was created from a temporary copy): its runs' artifacts are "
                    "lost. Log to a new experiment (mlflow.experiment in params.yaml).",
                    experiment, folder)


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
    lock = store_lock(uri)
    try:
        with _fail_fast_http(uri), lock:
            client = mlflow.MlflowClient()
            found = retry_on_lock(client.get_experiment_by_name)(experiment)
            if found is not None:
                experiment_id = found.experiment_id
                _check_artifact_location(found.artifact_location, experiment)
                for key, value in EXPERIMENT_TAGS.items():  # an experiment of an older version
                    # On a server, the kind's tag is written each time: a login that may read
                    # the experiment but not write it fails here, before any training (403).
                    if found.tags.get(key) != value or (is_http(uri) and key == KIND_TAG):
                        retry_on_lock(client.set_experiment_tag)(experiment_id, key, value)
            else:
                location = artifact_location(uri)
                try:
                    experiment_id = retry_on_lock(client.create_experiment)(
                        experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
                except Exception:  # created meanwhile by a parallel run
                    found = retry_on_lock(client.get_experiment_by_name)(experiment)
                    if found is None:
                        raise
                    experiment_id = found.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
    except ServerLostError as error:
        raise TrackingError(
            f"Cannot use the MLflow tracking store {uri} ({error.__cause__}). Check "
            "MLFLOW_TRACKING_URI (unset it to use the project's mlruns/ store) and the server."
        ) from error
    except TrackingError:
        raise
    except Exception as error:
        problem = login_error(error, uri, f"writing to the experiment {experiment!r}")
        if problem is not None:
            raise problem from None
        raise TrackingError(
            f"Cannot use the MLflow tracking store {uri} ({type(error).__name__}: {error}). "
            "Check MLFLOW_TRACKING_URI (unset it to use the project's mlruns/ store), the "
            "server, and the permissions of mlruns/."
        ) from error
    if is_http(uri):
        for name, value in STAGE_HTTP.items():
            if name not in os.environ:
                os.environ[name] = value
                _APPLIED.add(name)
    return experiment_id




def connect_existing(experiment: str) -> str:
    """Point MLflow at the store and return the id of ``experiment``, creating nothing: for
    commands that read what the pipeline logged."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # not this user's
    uri = tracking_uri()
    if custom_tracking_uri() is None and not (default_store_dir() / "mlflow.db").is_file():
        raise TrackingError(
            f"There is no MLflow store at {default_store_dir() / 'mlflow.db'} yet: run the "
            "pipeline first (dvc repro), run this from the project root, or set "
            "MLFLOW_TRACKING_URI.")
    mlflow.set_tracking_uri(uri)
    try:
        with _fail_fast_http(uri):
            found = retry_on_lock(mlflow.MlflowClient().get_experiment_by_name)(experiment)
    except Exception as error:
        problem = login_error(error, uri, f"the experiment {experiment!r}")
        if problem is not None:
            raise problem from None
        raise TrackingError(
            f"Cannot use the MLflow tracking store {uri} ({type(error).__name__}: {error}). "
            "Check MLFLOW_TRACKING_URI and the server.") from error
    if found is None:
        raise TrackingError(f"There is no MLflow experiment {experiment!r} in {uri}: check "
                            "mlflow.experiment in params.yaml (or --experiment), and that the "
                            "pipeline has run.")
    return found.experiment_id
