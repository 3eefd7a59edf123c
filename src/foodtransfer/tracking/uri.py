"""Which MLflow tracking store the project uses, and the login a tracking server asks for.

Small on purpose: every stage checks the login before any work (stages/runner.py), so every
stage lists this module in its dvc.yaml deps. The store itself: tracking/store.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from foodtransfer.errors import TrackingError


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


# For the check in connect() only: one try, with a short timeout, instead of MLflow's default
# of 7 retries with exponential backoff, which takes minutes to report an unreachable server.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Afterwards, during the stage: a server that stops answering (refuses connections) fails it
# within seconds (3 retries 1, 2 and 4 s apart) instead of MLflow's minutes of retries, while a
# restart of a few seconds passes unnoticed; 60 s per request leave room for large uploads.
# A user's own MLflow variables win.
STAGE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_APPLIED: set[str] = set()  # the STAGE_HTTP variables connect() set (the others are the user's)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                   "MLFLOW_TRACKING_TOKEN where the server takes tokens)")


def _who() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return f"MLFLOW_TRACKING_USERNAME={user!r}" if user else "MLFLOW_TRACKING_TOKEN"


def login_error(error: BaseException, uri: str, doing: str = "") -> TrackingError | None:
    """The one-line error for a tracking server that refused the login (401) or the
    permission (403) ``error`` reports, or None when it is another kind of error."""
    code = getattr(error, "error_code", None)
    text = str(error)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if code == "UNAUTHENTICATED" or "error code 401" in text:
        if not (user or password or token):
            return TrackingError(
                f"the tracking server {uri} asks for a login and none is set: set "
                f"{LOGIN_VARIABLES} to your account on it (docs/scale.md).")
        if bool(user) != bool(password):
            missing = "MLFLOW_TRACKING_PASSWORD" if user else "MLFLOW_TRACKING_USERNAME"
            return TrackingError(
                f"the tracking server {uri} asks for a login and {missing} is not set: set it "
                "(with the other) to your account on it (docs/scale.md).")
        if not user:
            return TrackingError(
                f"the tracking server {uri} refused the token in MLFLOW_TRACKING_TOKEN (401 "
                "unauthenticated): a basic-auth server (mlflow server --app-name basic-auth) "
                "takes MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead.")
        return TrackingError(
            f"the tracking server {uri} refused the login of {_who()} (401 unauthenticated): "
            "check MLFLOW_TRACKING_PASSWORD, or ask the server's admin for an account "
            "(docs/scale.md).")
    if code == "PERMISSION_DENIED" or "error code 403" in text:
        return TrackingError(
            f"the tracking server {uri} denied {_who()} {doing or 'this request'} (403 "
            "permission denied): ask the server's admin for the permission (docs/scale.md).")
    return None


def check_login(uri: str | None = None) -> None:
    """On a tracking server (http/https), one cheap request that fails fast, before any work,
    with one line naming the variable when the login is missing or refused."""
    uri = uri or tracking_uri()
    if not is_http(uri):
        return
    import mlflow

    try:
        with _fail_fast_http(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:
        problem = login_error(error, uri)
        if problem is not None:
            raise problem from None
        raise TrackingError(
            f"Cannot use the MLflow tracking store {uri} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Check MLFLOW_TRACKING_URI "
            "(unset it to use the project's mlruns/ store) and the server.") from None


@contextlib.contextmanager
def _fail_fast_http(uri: str) -> Iterator[None]:
    """While connect() checks a tracking server, let MLflow try each request once (unless the
    user set these variables); later calls get STAGE_HTTP's bounded retries."""
    saved = {name: os.environ.get(name) for name in FAIL_FAST_HTTP}
    if is_http(uri):
        for name, value in FAIL_FAST_HTTP.items():
            if name not in os.environ or name in _APPLIED:  # not the user's own setting
                os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
