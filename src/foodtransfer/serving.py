"""The champion beyond Python: ``foodtransfer serve`` (MLflow's scoring server over HTTP) and
``foodtransfer export`` (a TensorFlow SavedModel for TF Serving, or ONNX).

The served model is the logged pyfunc: POST ``/invocations`` with ``{"inputs": images}``
(a nested list ``(n, image_size, image_size, 3)`` of RGB pixels 0..255) returns
``{"predictions": [{class: probability, ...}, ...]}``; ``/ping`` answers 200 when it is up; a
bad request (wrong shape, not numbers) is a 400 with a message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from foodtransfer.errors import UserError
from foodtransfer.predict import ModelLoadError, check_store, input_size
from foodtransfer.tracking import store
from foodtransfer.tracking.registry import registered_version


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow models serve`` command for ``model_uri`` in this environment (no new
    virtualenv: ``--env-manager local``), after checking that the model resolves."""
    input_size(model_uri)  # a clear error now rather than from the server's start-up
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", host, "--port", str(port)]


def serve_environment() -> dict[str, str]:
    """The server's environment: this project's tracking store, to resolve models:/ URIs, and
    this environment's scripts first on PATH (MLflow starts ``uvicorn`` by name: without it,
    ``.venv/bin/foodtransfer serve`` from a shell that has not activated the venv fails)."""
    import os

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri(), "PATH": path}


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
