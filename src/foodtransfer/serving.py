"""The champion beyond Python: ``foodtransfer serve`` (MLflow's scoring server over HTTP) and
``foodtransfer export`` (a TensorFlow SavedModel for TF Serving, or ONNX).

The served model is the logged pyfunc: POST ``/invocations`` with ``{"inputs": images}``
(a nested list ``(n, image_size, image_size, 3)`` of RGB pixels 0..255) returns
``{"predictions": [{class: probability, ...}, ...]}``; ``/ping`` answers 200 when it is up; a
bad request (wrong shape, not numbers) is a 400 with a message.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from foodtransfer.errors import UserError
from foodtransfer.predict import ModelLoadError, check_store, input_size
from foodtransfer.tracking import store
from foodtransfer.tracking.registry import registered_version


# The largest request body the scoring server reads: a 50 MP phone photo is at most about
# 25 MB as JPEG, 33 MB as base64 text; anything larger is refused with 413 before it is parsed.
MAX_REQUEST_BYTES = 40 * 1024 * 1024
MAX_REQUEST_ENV = "FOODTRANSFER_MAX_REQUEST_BYTES"
MODEL_PATH_ENV = "__pyfunc_model_path__"  # what MLflow's scoring app loads (its own variable)
BODY_DEADLINE_S = 60.0  # a body not received (or drained) within this is answered 408
# Requests with a body read and scored at once; more get 503 (Retry-After: 1) before their body
# is read: each holds up to the body limit, and JSON pixel arrays several times that parsed.
MAX_IN_FLIGHT = 4


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    """The scoring server for ``model_uri``: MLflow's own app (what ``mlflow models serve
    --env-manager local`` runs) behind :class:`BodyLimit`, under uvicorn, after checking that
    the model resolves."""
    input_size(model_uri)  # a clear error now rather than from the server's start-up
    return [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(port),
            "--no-access-log", "foodtransfer.serving_app:app"]


def serve_environment(model_uri: str, max_request_bytes: int = MAX_REQUEST_BYTES
                      ) -> dict[str, str]:
    """The server's environment: the model, this project's tracking store (to resolve
    models:/ URIs), the body limit, and this environment's scripts first on PATH."""
    import os

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri(), "PATH": path,
            MODEL_PATH_ENV: model_uri, MAX_REQUEST_ENV: str(max_request_bytes)}


class BodyLimit:
    """ASGI middleware: a request whose body is over ``max_bytes`` gets 413 before the app
    sees it, whether it declares its length or sends it in chunks. Nothing over the limit is
    kept: a client that asked ``Expect: 100-continue`` (curl does for large bodies) is
    answered before it sends the body; otherwise the body is read and dropped (up to
    :data:`DRAIN_FACTOR` times the limit) so that the client, still sending, can read the
    answer instead of a reset connection. A body within the limit is handed on whole."""

    DRAIN_FACTOR = 8

    def __init__(self, app, max_bytes: int, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)  # /ping, /health, /version: no body
            return
        if self.in_flight >= self.max_in_flight:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"expect", b"").lower() != b"100-continue":
                # Read and drop the body (bounded), so that the client reads the 503 rather
                # than a reset connection.
                await self._drain(receive, 0,
                                  asyncio.get_running_loop().time() + BODY_DEADLINE_S)
            await self._refuse(send, 0, status=503)
            return
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        deadline = asyncio.get_running_loop().time() + BODY_DEADLINE_S
        if declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await self._drain(receive, 0, deadline)
            await self._refuse(send, int(declared))
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(
                    receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                chunks.clear()
                await self._refuse(send, size, status=408)
                return
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                chunks.clear()
                more = message.get("more_body", False)
                if more:
                    await self._drain(receive, size, deadline)
                await self._refuse(send, size, at_least=more)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        chunks.clear()

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive, size: int, deadline: float) -> None:
        """Read the rest of the body and drop it (up to DRAIN_FACTOR times the limit, until
        the deadline)."""
        loop = asyncio.get_running_loop()
        while size <= self.DRAIN_FACTOR * self.max_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send, size: int, at_least: bool = False,
                      status: int = 413) -> None:
        code, message = {
            413: ("REQUEST_TOO_LARGE",
                  f"the request body is {'over ' if at_least else ''}{size} bytes, over the "
                  f"server's limit of {self.max_bytes} bytes ({MAX_REQUEST_ENV}); send fewer "
                  "or smaller photos per request"),
            408: ("REQUEST_TIMEOUT", f"the request body did not arrive within "
                                     f"{BODY_DEADLINE_S:.0f} s ({size} bytes received)"),
            503: ("TEMPORARILY_UNAVAILABLE",
                  f"the server is scoring {self.max_in_flight} requests already (its limit); "
                  "retry in a second")}[status]
        text = json.dumps({"error_code": code, "message": message}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(text)).encode()), (b"connection", b"close")]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": text})


def _unreadable(model_uri: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot read the model {model_uri}: {error}. Is it a foodtransfer "
                          "model (models:/<name>@champion, runs:/<id>/model)?")


def logged_keras_model(model_uri: str) -> tuple[Path, Path]:
    """The Keras model file and the class-names file inside the foodtransfer pyfunc at
    ``model_uri``, downloaded from this project's store (the paths its MLmodel names)."""
    import mlflow

    check_store(model_uri)
    mlflow.set_tracking_uri(store.tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
        artifacts = mlflow.models.Model.load(local).flavors["python_function"]["artifacts"]
        return (local / artifacts["keras_model"]["path"],
                local / artifacts["class_names"]["path"])
    except (KeyError, OSError, mlflow.exceptions.MlflowException) as error:
        raise _unreadable(model_uri, error) from error


FORMATS = ("saved_model", "onnx")


class ExportError(UserError):
    """An export the installed packages cannot write."""


def export_model(model_uri: str, out: Path, fmt: str = "saved_model") -> Path:
    """Write the Keras model inside the pyfunc ``model_uri`` into ``out/<version>/`` (the
    registry version, or 1), atomically, with the class names beside it:

    - ``saved_model``: a TensorFlow SavedModel (Keras ``model.export``: a ``serve`` signature
      from float32 images 0..255 to class probabilities), class names in
      ``assets.extra/classes.json``, as TF Serving expects;
    - ``onnx``: ``model.onnx`` (the inference function converted by tf2onnx, opset 17; input
      ``images``, float32 ``(n, size, size, 3)`` 0..255, output class probabilities) and
      ``classes.json``.

    Returns that folder."""
    import keras
    import mlflow

    import foodtransfer.models.classifiers  # noqa: F401  (registers the model's layers)
    from foodtransfer.atomic import atomic_dir

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if fmt == "onnx":
        _check_onnx_installed()
    keras_path, class_names_path = logged_keras_model(model_uri)
    try:
        class_names = json.loads(class_names_path.read_text())
        version = registered_version(model_uri) or "1"
    except (OSError, mlflow.exceptions.MlflowException) as error:
        raise _unreadable(model_uri, error) from error
    model = keras.saving.load_model(keras_path, compile=False)
    target = out / version
    with atomic_dir(target) as tmp:
        if fmt == "saved_model":
            model.export(str(tmp), format="tf_saved_model", verbose=False)
            (tmp / "assets.extra").mkdir(exist_ok=True)
            (tmp / "assets.extra" / "classes.json").write_text(json.dumps(class_names) + "\n")
        else:
            _export_onnx(model, tmp / "model.onnx")
            (tmp / "classes.json").write_text(json.dumps(class_names) + "\n")
    return target


ONNX_OPSET = 17
ONNX_INPUT = "images"


def _export_onnx(model, path: Path) -> None:
    """The model's inference function (``training=False`` given explicitly: Keras' own
    ``export(format="onnx")`` traced the dropout of a head called twice, as with TTA, into
    random ops onnxruntime has not) converted by tf2onnx."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=ONNX_INPUT),)
    function = tf.function(lambda images: model(images, training=False), input_signature=spec)
    tf2onnx.convert.from_function(function, input_signature=spec, opset=ONNX_OPSET,
                                  output_path=str(path))


def _check_onnx_installed() -> None:
    import importlib.util

    missing = [name for name in ("tf2onnx", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"the ONNX export needs {' and '.join(missing)}: pip install "
                          "'foodtransfer[onnx]' (make install includes it).")


def onnx_session(model_file: Path):
    """An onnxruntime session on ``model_file`` (CPU), and its input's name."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file),
                                           providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def tf_serving_hint(out: Path, name: str = "food101") -> str:
    return (f"TF Serving: docker run -p 8501:8501 -v {out.resolve()}:/models/{name} -e "
            f"MODEL_NAME={name} tensorflow/serving, then POST {{\"instances\": images}} to "
            f"http://localhost:8501/v1/models/{name}:predict")
