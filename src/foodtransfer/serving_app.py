"""The scoring server's ASGI app, as ``foodtransfer serve`` runs it under uvicorn: MLflow's own
scoring app (``mlflow.pyfunc.scoring_server``: /ping, /health, /version, /invocations, loading
the model named by ``__pyfunc_model_path__``) behind a limit on the request body
(:class:`foodtransfer.serving.BodyLimit`, ``FOODTRANSFER_MAX_REQUEST_BYTES``)."""

from __future__ import annotations

import os

from mlflow.pyfunc.scoring_server import init, load_model_with_mlflow_config

from foodtransfer.serving import MAX_REQUEST_BYTES, MAX_REQUEST_ENV, MODEL_PATH_ENV, BodyLimit

app = BodyLimit(init(load_model_with_mlflow_config(os.environ[MODEL_PATH_ENV])),
                int(os.environ.get(MAX_REQUEST_ENV, MAX_REQUEST_BYTES)))
