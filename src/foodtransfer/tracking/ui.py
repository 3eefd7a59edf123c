"""``foodtransfer ui``: the MLflow UI command line for this project's store."""

from __future__ import annotations

import sys

from foodtransfer.errors import TrackingError
from foodtransfer.tracking.store import custom_tracking_uri, default_store_dir, default_tracking_uri


# One user on a laptop: one web worker, and no job runner (MLflow's GenAI evaluation jobs start
# 7 queue consumer processes by default; the UI of training runs needs none).
UI_WORKERS = 1
UI_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def runs_url(base: str, experiment_id: str | None) -> str:
    """The page of an experiment's runs table. MLflow's UI takes the page kind from its own
    GenAI / model-training toggle (GenAI by default in a fresh browser), not from the
    experiment's tags: ``workflowType=machine_learning`` opens the runs."""
    if experiment_id is None:
        return base
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


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
    command += ["--host", host, "--port", str(port), "--workers", str(UI_WORKERS)]
    return command, f"http://{host}:{port}"
