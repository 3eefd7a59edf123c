"""Classify image files with a logged model: the logic behind ``foodtransfer predict``.

The model is the MLflow pyfunc the variant stages log (raw RGB images in, class probabilities
out), by default the registry's champion ``models:/<mlflow.registered_model>@champion``.
Images are decoded exactly as the trim stage decodes the training images
(:func:`foodtransfer.data.images.decode_image`: any PIL format, converted to RGB, resized to the
model's input size), so a photo gets the same pixels it would have had in the dataset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foodtransfer.errors import UserError
from foodtransfer.tracking.registry import CHAMPION_ALIAS

# Decoded images handed to the model per predict() call: bounds the memory of decoded pixels
# (the model itself runs them IMAGE_BATCH at a time).
IMAGES_PER_CALL = 256
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageInputError(UserError):
    """An input image is missing, unreadable, or a folder holds no images."""


class ModelLoadError(UserError):
    """The model URI names no model, or the model cannot be loaded or used."""


@dataclass(frozen=True)
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image,
                "predictions": [{"class_name": name, "probability": probability}
                                for name, probability in self.top]}


# -------------------------------------------------------------------------------- images
def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched recursively for
    image suffixes (sorted). Raises ImageInputError for a missing path or an empty folder."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            images = sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ImageInputError(
                    f"{path}: the folder holds no images (looked for "
                    f"{', '.join(IMAGE_SUFFIXES)} files, recursively).")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise ImageInputError(f"{path}: no such file or folder.")
    return found


def read_images(paths: Sequence[Path], height: int, width: int) -> np.ndarray:
    """Decode ``paths`` to a uint8 array (n, height, width, 3), as the trim stage decodes; the
    first unreadable one raises ImageInputError."""
    images, _, failures = read_readable(paths, height, width)
    if failures:
        raise ImageInputError(failures[0])
    return images


def read_readable(paths: Sequence[Path], height: int, width: int
                  ) -> tuple[np.ndarray, list[Path], list[str]]:
    """The images of ``paths`` that decode (as the trim stage decodes), their paths, and one
    message per path that does not."""
    from foodtransfer.data.images import decode_image

    if height != width:
        raise ModelLoadError(f"the model expects {height}x{width} images; foodtransfer "
                             "models take square images.")
    images = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    readable: list[Path] = []
    failures: list[str] = []
    for path in paths:
        decoded = decode_image(path, height)
        if decoded.pixels is None:
            failures.append(f"{path}: cannot read it as an image: {decoded.reason}.")
            continue
        images[len(readable)] = decoded.pixels
        readable.append(path)
    return images[:len(readable)], readable, failures


# --------------------------------------------------------------------------------- model
def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = (text[0] if text else type(error).__name__).rstrip(".")
    return message if len(message) <= 300 else message[:297] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's loading advice (environment mismatches, type hints) is not for this user."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # MLflow re-enables UserWarnings ("once") around its type-hint advice; drop what
            # gets through. catch_warnings restores showwarning on exit.
            warnings.showwarning = lambda *args, **kwargs: None
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_store(model_uri: str) -> None:
    """``models:/`` and ``runs:/`` URIs need the tracking store: fail clearly (and do not
    create an empty ``mlflow.db``) when the project's store does not exist."""
    from foodtransfer.tracking import store

    if not model_uri.startswith(("models:/", "runs:/")):
        return
    if store.custom_tracking_uri():
        store.check_login()  # a team server: its login, in one line, before anything else
        return
    database = store.default_store_dir() / "mlflow.db"
    if not database.is_file():
        raise ModelLoadError(
            f"cannot resolve {model_uri}: there is no MLflow store at {database}. Run the "
            "pipeline first (dvc repro), run this from the project root, or set "
            "MLFLOW_TRACKING_URI.")


def input_size(model_uri: str) -> tuple[int, int]:
    """(height, width) of the images the model takes, from its metadata (or signature)."""
    import mlflow
    from mlflow.models import get_model_info

    from foodtransfer.tracking import store

    check_store(model_uri)
    mlflow.set_tracking_uri(store.tracking_uri())
    try:
        with _quiet():
            info = get_model_info(model_uri)
    except Exception as error:  # MLflow raises many types for a URI it cannot resolve
        hint = ""
        if model_uri.startswith("models:/") and model_uri.endswith(f"@{CHAMPION_ALIAS}"):
            hint = (" A champion exists once a candidate is promoted: run 'dvc repro' first "
                    "(on the project's own store it promotes its winner) or 'foodtransfer "
                    "promote N', check mlflow.registered_model in params.yaml, or pass "
                    "--model-uri.")
        raise ModelLoadError(
            f"cannot load the model {model_uri} from {store.tracking_uri()}: "
            f"{_short(error)}.{hint} Use runs:/<run_id>/model, models:/<name>@<alias>, "
            "models:/<name>/<version>, models:/<model_id> or a local model folder.") from error
    side = (info.metadata or {}).get("image_size")
    if side is not None:
        return int(side), int(side)
    # Models logged before the metadata: the input schema says it.
    signature = info.signature
    shape = None
    if signature is not None and signature.inputs is not None:
        specs = signature.inputs.inputs
        if specs and getattr(specs[0], "shape", None) is not None:
            shape = tuple(specs[0].shape)
    if shape is None or len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
        raise ModelLoadError(
            f"the model {model_uri} has no image size in its metadata or signature (found "
            f"{shape}): it is not a foodtransfer image classifier.")
    return int(shape[1]), int(shape[2])


def load_model(model_uri: str):
    import mlflow

    from foodtransfer.tracking import store

    mlflow.set_tracking_uri(store.tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with _quiet():
            return mlflow.pyfunc.load_model(model_uri)
    except Exception as error:
        raise ModelLoadError(f"cannot load the model {model_uri}: {_short(error)}") from error


def probabilities(model, images: np.ndarray, batch_size: int = IMAGES_PER_CALL):
    """The model's class probabilities (a DataFrame, one column per class) for uint8 images."""
    import pandas as pd

    frames = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]  # uint8, as decoded
        with _quiet():
            frames.append(model.predict(batch))
    return pd.concat(frames, ignore_index=True)


def top_k(frame, k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable (class, probability) pairs of each row (k capped at the
    number of classes)."""
    values = frame.to_numpy(dtype="float64")
    names = [str(column) for column in frame.columns]
    k = min(k, len(names))
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [[(names[j], float(values[i, j])) for j in row] for i, row in enumerate(order)]


def predict_files(inputs: Sequence[Path], model_uri: str, k: int
                  ) -> tuple[list[Prediction], list[str]]:
    """Top-``k`` classes of every readable image named by ``inputs`` (files or folders), and
    one message per image that could not be read. None readable: ImageInputError."""
    if k < 1:
        raise UserError(f"--top-k must be at least 1, got {k}.")
    paths = collect_images(inputs)
    height, width = input_size(model_uri)
    images, readable, failures = read_readable(paths, height, width)
    if not readable:  # before loading the model: nothing to classify
        raise ImageInputError(" ".join(failures))
    model = load_model(model_uri)
    try:
        frame = probabilities(model, images)
    except Exception as error:
        raise ModelLoadError(f"the model {model_uri} failed on the images: "
                             f"{_short(error)}") from error
    return ([Prediction(str(path), top) for path, top in zip(readable, top_k(frame, k))],
            failures)


def format_text(predictions: Sequence[Prediction]) -> str:
    lines = []
    for prediction in predictions:
        lines.append(prediction.image)
        width = max(len(name) for name, _ in prediction.top)
        lines += [f"  {rank}. {name:<{width}}  {probability:.4f}"
                  for rank, (name, probability) in enumerate(prediction.top, 1)]
    return "\n".join(lines)
