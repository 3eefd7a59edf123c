"""``foodtransfer ui``: the MLflow UI command line for this project's store."""

from __future__ import annotations

import sys

from foodtransfer.errors import TrackingError
from foodtransfer.tracking.store import custom_tracking_uri, default_store_dir, default_tracking_uri


def ui_command(port: int, host: str = "127.0.0.1") -> tuple[list[str], str]:
    """The ``mlflow ui`` command line for this project's store, and the URL it serves.

    The project's store needs the explicit backend and artifact root (without them MLflow
    opens a fresh ``mlflow.db`` in the working directory); ``MLFLOW_TRACKING_URI`` names
    another database store. A tracking server (http/https) has its own UI: that URL is
    returned with an empty command."""
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
