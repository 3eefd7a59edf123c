"""params.yaml, read once into typed, validated objects.

Stages call :func:`load_params` at their entry point; library code receives the typed objects
and never opens params.yaml itself. Validation rejects unknown keys (DVC's ``-S`` adds typo'd
keys silently), wrong types and out-of-range values, naming the key, the bad value and what is
allowed, before any download or training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from foodtransfer import food101
from foodtransfer.errors import ConfigError

FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
FOOD101_MD5 = "85eeb15f3717b99a5da872d97d918f87"
DEFAULT_CLASSES = [
    "apple_pie", "carrot_cake", "chicken_curry", "chocolate_cake", "churros", "falafel",
    "fish_and_chips", "french_fries", "greek_salad", "hamburger", "hot_dog", "hummus",
    "ice_cream", "lasagna", "nachos", "panna_cotta", "pizza", "risotto",
    "spaghetti_bolognese", "tacos",
]  # fmt: skip

# The tf.distribute strategies of foodtransfer.distribute.make_strategy.
StrategyName = Literal["auto", "mirrored", "multi_worker"]

# The names of foodtransfer.backbones.BACKBONES, here so validating params needs no TensorFlow.
BACKBONES = ("EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetB0", "EfficientNetB3",
             "MobileNetV2", "ResNet50", "VGG16", "ConvNeXtTiny")

FIX_HINT = "Fix it in params.yaml, or override it with 'dvc exp run -S {key}=<value>'."


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> dict[str, Any]:
    return {"low": low, "high": high, "low_open": low_open, "high_open": high_open}


@dataclass(frozen=True)
class SampleConfig:
    """Shape of the generated offline sample archive (``data.source: sample``)."""

    train_per_class: int = field(default=300, metadata=_range(1))
    test_per_class: int = field(default=100, metadata=_range(1))
    min_side: int = field(default=160, metadata=_range(8))
    max_side: int = field(default=400, metadata=_range(8))


@dataclass(frozen=True)
class DataConfig:
    source: Literal["food101", "sample"] = "food101"
    url: str = FOOD101_URL
    md5: str | None = FOOD101_MD5
    classes: list[str] | Literal["all"] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    samples_per_class: int | Literal["all"] = field(default=256, metadata=_range(1))
    allow_fewer: bool = False
    val_fraction: float = field(default=0.2, metadata=_range(0, 1, low_open=True, high_open=True))
    test_per_class: int | Literal["all"] = field(default=100, metadata=_range(1))
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass(frozen=True)
class BaselineConfig:
    epochs: int = field(default=20, metadata=_range(1))
    learning_rate: float = field(default=1e-3, metadata=_range(0, 1, low_open=True))
    augment: bool = True
    image_size: int = field(default=128, metadata=_range(16, 1024))


@dataclass(frozen=True)
class FineTuneConfig:
    epochs: int = field(default=10, metadata=_range(0))
    lr_scale: float = field(default=0.1, metadata=_range(0, 1, low_open=True))
    # A number of top backbone layers to unfreeze, or "all".
    unfreeze: int | Literal["all"] = field(default=30, metadata=_range(1))
    augment: bool = False
    # Compute the frozen bottom of the backbone once and train only the top on its cached
    # output (exact; applies when augment is false and unfreeze leaves a frozen bottom).
    cache_frozen: bool = True


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "food101-transfer"
    # The model registry name of the champion (best variant by validation accuracy).
    registered_model: str = "food101-classifier"


@dataclass(frozen=True)
class Params:
    seed: int = field(default=42, metadata=_range(0, 2**31 - 1))
    image_size: int = field(default=256, metadata=_range(16, 1024))
    backbone: str = "EfficientNetV2B0"
    weights: str = "imagenet"
    batch_size: int = field(default=32, metadata=_range(1, 4096))
    epochs: int = field(default=100, metadata=_range(1))
    learning_rate: float = field(default=1e-3, metadata=_range(0, 1, low_open=True))
    optimizer: Literal["nadam", "adam", "sgd", "rmsprop"] = "nadam"
    lr_schedule: Literal["none", "plateau", "cosine"] = "plateau"
    dropout: float = field(default=0.6, metadata=_range(0, 1, high_open=True))
    l1: float = field(default=1e-5, metadata=_range(0))
    l2: float = field(default=1e-5, metadata=_range(0))
    patience: int = field(default=10, metadata=_range(1))
    # Where training runs (foodtransfer.distribute): one device, all GPUs, or several machines.
    strategy: StrategyName = "auto"
    # float16 compute with float32 variables and softmax, on GPUs only (off on CPU).
    mixed_precision: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_describe_type(item)}"
    if annotation is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _fail(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(
        f"params: {key} = {value!r} {problem}. {FIX_HINT.format(key=key)}"
    )


def _coerce(key: str, value: Any, annotation: Any, metadata: typing.Mapping[str, Any]) -> Any:
    """Return ``value`` checked against ``annotation``, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        # Try the non-Literal alternatives last so "all" is matched before str.
        errors: list[ConfigError] = []
        for arg in sorted(args, key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return _coerce(key, value, arg, metadata)
            except ConfigError as error:
                errors.append(error)
        # A value of the right type but out of range: report the range, not the type.
        for error in errors:
            if "out of range" in str(error):
                raise error
        raise _fail(key, value, f"has the wrong type: expected {_describe_type(annotation)}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise _fail(key, value, "is not allowed: choose one of "
                        + ", ".join(repr(a) for a in allowed))
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list) or not value:
            raise _fail(key, value, f"has the wrong type: expected {_describe_type(annotation)} "
                        "(non-empty)")
        return [_coerce(f"{key}[{i}]", item, item_type, {}) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _fail(key, value, "must be a section (a mapping of keys to values)")
        return _build(annotation, value, prefix=f"{key}.")
    if annotation is type(None):
        if value is not None:
            raise _fail(key, value, "must be null")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise _fail(key, value, "has the wrong type: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "has the wrong type: expected an integer")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, value, "has the wrong type: expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise _fail(key, value, "must be a finite number")
    elif annotation is str:
        if not isinstance(value, str) or not value:
            raise _fail(key, value, "has the wrong type: expected a non-empty string")
        return value
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and (value < low or (metadata.get("low_open") and value == low)):
        raise _fail(key, value, f"is out of range: {_range_text(metadata)}")
    if high is not None and (value > high or (metadata.get("high_open") and value == high)):
        raise _fail(key, value, f"is out of range: {_range_text(metadata)}")
    return value


def _range_text(metadata: typing.Mapping[str, Any]) -> str:
    parts = []
    if metadata.get("low") is not None:
        parts.append(f"{'>' if metadata.get('low_open') else '>='} {metadata['low']:g}")
    if metadata.get("high") is not None:
        parts.append(f"{'<' if metadata.get('high_open') else '<='} {metadata['high']:g}")
    return "must be " + " and ".join(parts)


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"params: unknown key '{full}'.{hint} Known keys here: "
                f"{', '.join(prefix + name for name in fields)}. Remove or rename it in "
                "params.yaml (dvc exp run -S adds misspelt keys silently)."
            )
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(f"{prefix}{name}", raw[name], hints[name], spec.metadata)
    return cls(**values)


def _check_cross_fields(params: Params) -> None:
    if params.backbone not in BACKBONES:
        raise ConfigError(
            f"params: backbone = {params.backbone!r} is not a known backbone: choose one of "
            f"{', '.join(BACKBONES)}. {FIX_HINT.format(key='backbone')}"
        )
    weights = params.weights
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ConfigError(
            f"params: weights = {weights!r} is neither 'imagenet', 'none' nor an existing "
            f"weights file (looked for {Path(weights).resolve()}). "
            f"{FIX_HINT.format(key='weights')}"
        )
    name = params.mlflow.registered_model
    if name != name.strip() or any(c in name for c in "/:@'\""):
        raise ConfigError(
            f"params: mlflow.registered_model = {name!r} is not a usable model registry name: "
            "no '/', ':', '@' (models:/<name>@<alias> URIs use them), quotes, or leading or "
            f"trailing spaces. {FIX_HINT.format(key='mlflow.registered_model')}"
        )
    data = params.data
    if data.sample.min_side > data.sample.max_side:
        raise ConfigError(
            f"params: data.sample.min_side = {data.sample.min_side} is larger than "
            f"data.sample.max_side = {data.sample.max_side}; min_side must be <= max_side."
        )
    if isinstance(data.classes, list):
        if len(set(data.classes)) != len(data.classes):
            duplicates = sorted({c for c in data.classes if data.classes.count(c) > 1})
            raise ConfigError(f"params: data.classes lists {duplicates} more than once.")
        if len(data.classes) < 2:
            raise ConfigError(
                f"params: data.classes = {data.classes!r} needs at least 2 classes to classify."
            )
        unknown = [c for c in data.classes if c not in food101.CLASSES]
        if unknown:
            suggestions = {c: difflib.get_close_matches(c, food101.CLASSES, n=1) for c in unknown}
            hints = "; ".join(f"{c!r} (did you mean {s[0]!r}?)" if s else repr(c)
                              for c, s in suggestions.items())
            raise ConfigError(
                f"params: data.classes has classes that Food-101 does not have: {hints}. "
                f"Known classes: {', '.join(food101.CLASSES)}, or 'all'."
            )
    scheme = data.url.split("://", 1)[0].lower() if "://" in data.url else ""
    if data.source == "food101" and scheme not in ("http", "https", "file"):
        raise ConfigError(
            f"params: data.url = {data.url!r} is not an http://, https:// or file:// URL. "
            f"{FIX_HINT.format(key='data.url')}"
        )
    if data.md5 is not None and (len(data.md5) != 32 or any(c not in "0123456789abcdef"
                                                             for c in data.md5.lower())):
        raise ConfigError(
            f"params: data.md5 = {data.md5!r} is not an md5 hex digest (32 hex digits) or null. "
            f"{FIX_HINT.format(key='data.md5')}"
        )


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping into :class:`Params`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: the file must hold a mapping of keys, not {type(raw).__name__}")
    params = _build(Params, raw)
    _check_cross_fields(params)
    return params


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate ``path``. Raises :class:`ConfigError` with a fix-it message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: {path} not found. Run the stage from the project root.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"params: {path} is not valid YAML: {error}") from error
    return parse_params(raw)


def flatten(params: Params) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` pairs (for MLflow params)."""
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, list):
                flat[f"{prefix}{f.name}"] = ",".join(map(str, value))
            else:
                flat[f"{prefix}{f.name}"] = value

    walk(params, "")
    return flat
