"""params.yaml, read once into typed, validated objects (pydantic models).

Stages call :func:`load_params` at their entry point; library code receives the typed objects
and never opens params.yaml itself. Validation rejects unknown keys (DVC's ``-S`` adds typo'd
keys silently), wrong types and out-of-range values, naming the key, the bad value and what is
allowed, before any download or training starts. Pydantic does the checking; this module only
turns its errors into one line a user can act on.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from foodtransfer.data import food101
from foodtransfer.config_errors import FIX_HINT, translate
from foodtransfer.errors import ConfigError

FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
FOOD101_MD5 = "85eeb15f3717b99a5da872d97d918f87"
DEFAULT_CLASSES = [
    "apple_pie", "carrot_cake", "chicken_curry", "chocolate_cake", "churros", "falafel",
    "fish_and_chips", "french_fries", "greek_salad", "hamburger", "hot_dog", "hummus",
    "ice_cream", "lasagna", "nachos", "panna_cotta", "pizza", "risotto",
    "spaghetti_bolognese", "tacos",
]  # fmt: skip

# The allowed `backbone` values (keras.applications model names) and how each expects its
# inputs scaled (foodtransfer.models.backbones turns this into a layer inside the model).
BACKBONES: dict[str, str] = {
    "EfficientNetV2B0": "builtin", "EfficientNetV2B1": "builtin", "EfficientNetB0": "builtin",
    "EfficientNetB3": "builtin", "MobileNetV2": "mobilenet", "ResNet50": "caffe",
    "VGG16": "caffe", "ConvNeXtTiny": "builtin",
}

# The tf.distribute strategies of foodtransfer.training.distribute.make_strategy.
StrategyName = Literal["auto", "mirrored", "multi_worker"]


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Rate = Annotated[float, Field(gt=0, le=1)]
NonEmpty = Annotated[str, Field(min_length=1)]


# Which params a stage reads, recorded where FOODTRANSFER_RECORD_PARAMS names a folder (the
# DAG test's run of the pipeline): the stage runner writes ``<folder>/<stage>.json``, and
# tests/test_dag.py checks each stage's params in dvc.yaml against it.
RECORD_PARAMS_ENV = "FOODTRANSFER_RECORD_PARAMS"
_read_keys: set[str] | None = None  # the dotted keys read since recording started
_section_prefixes: dict[int, str] = {}  # id(section object) -> "section." of the loaded params


class Section(BaseModel):
    """A params section: no unknown keys, no type coercion ("10" is not 10), finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _read_keys is not None and not name.startswith("_"):
            prefix = _section_prefixes.get(id(self))
            if (prefix is not None and name in type(self).model_fields
                    and not isinstance(value, Section)):
                _read_keys.add(prefix + name)
        return value


def record_reads(params: "Params") -> None:
    """From now on, remember which keys of ``params`` the code reads (a leaf read through
    its section counts as the dotted key; ``flatten``, which logs them all, does not)."""
    global _read_keys

    def walk(section: Section, prefix: str) -> None:
        _section_prefixes[id(section)] = prefix
        for name in type(section).model_fields:
            value = object.__getattribute__(section, "__dict__")[name]
            if isinstance(value, Section):
                walk(value, f"{prefix}{name}.")

    walk(params, "")
    _read_keys = set()


def params_read() -> list[str] | None:
    """The keys read since :func:`record_reads` (None when not recording)."""
    return None if _read_keys is None else sorted(_read_keys)


class SampleConfig(Section):
    """Shape of the generated offline sample archive (``data.source: sample``)."""

    train_per_class: PositiveInt = 300
    test_per_class: PositiveInt = 100
    min_side: Annotated[int, Field(ge=8)] = 160
    max_side: Annotated[int, Field(ge=8)] = 400


class DataConfig(Section):
    # Everything upstream of training: the generated sample, which images trim keeps, the
    # split, and the random backbone of weights=none (the top-level seed is training's).
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    source: Literal["food101", "sample"] = "food101"
    url: NonEmpty = FOOD101_URL
    md5: NonEmpty | None = FOOD101_MD5
    classes: Annotated[list[str], Field(min_length=1)] | Literal["all"] = Field(
        default_factory=lambda: list(DEFAULT_CLASSES))
    samples_per_class: PositiveInt | Literal["all"] = 256
    allow_fewer: bool = False
    val_fraction: Fraction = 0.2
    test_per_class: PositiveInt | Literal["all"] = 100
    sample: SampleConfig = SampleConfig()


class FeaturesConfig(Section):
    # The backbone sees the centre `crop` share of each image (round(image_size * crop) px);
    # 1.0: the whole image, resized (the reference recipe); 0.875: 224 of 256 px.
    crop: Annotated[float, Field(gt=0, le=1)] = 0.875
    # Seeded augmented views (random resized crop, flip, colour jitter) of each training image
    # cached beside its plain features, so the heads train on augmented data at cache speed.
    views: Annotated[int, Field(ge=0, le=64)] = 2
    # Validation and test predictions averaged with those of the flipped image (test-time
    # augmentation), in the deployed model too.
    tta: bool = True


class BaselineConfig(Section):
    epochs: PositiveInt = 20
    learning_rate: Rate = 1e-3
    augment: bool = True
    image_size: Annotated[int, Field(ge=16, le=1024)] = 128


class FinetuneConfig(Section):
    epochs: Annotated[int, Field(ge=0)] = 10
    lr_scale: Rate = 0.3  # fine-tune learning rate = learning_rate * lr_scale
    # A number of top backbone layers to unfreeze, or "all".
    unfreeze: PositiveInt | Literal["all"] = 30
    augment: bool = False
    # Compute the frozen bottom of the backbone once and train only the top on its cached
    # output (exact; applies when augment is false and unfreeze leaves a frozen bottom).
    cache_frozen: bool = True
    # Augmented views of each training image in that cache; epoch e trains on view e mod
    # (views + 1) (view 0: the plain image), so an epoch costs what a plain one does.
    views: Annotated[int, Field(ge=0, le=64)] = 4
    # The fine-tune learning-rate schedule: plateau (ReduceLROnPlateau), cosine (decay to zero
    # over finetune.epochs) or none.
    lr_schedule: Literal["none", "plateau", "cosine"] = "cosine"
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0


class MlflowConfig(Section):
    experiment: NonEmpty = "food101-transfer"
    # The production model: its @champion is what predict and serve use. Each execution
    # registers its winner (best variant by validation accuracy) in <name>-candidates.
    registered_model: NonEmpty = "food101-classifier"


class Params(Section):
    # Training's randomness: initial weights of what is trained, shuffling, dropout,
    # augmentation. Sweeping it re-runs only the training stages (data.seed: the data).
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    image_size: Annotated[int, Field(ge=16, le=1024)] = 256
    backbone: NonEmpty = "EfficientNetV2B0"
    weights: NonEmpty = "imagenet"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    epochs: PositiveInt = 100
    learning_rate: Rate = 1e-3
    optimizer: Literal["nadam", "adam", "sgd", "rmsprop"] = "nadam"
    lr_schedule: Literal["none", "plateau", "cosine"] = "plateau"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.6
    l1: Annotated[float, Field(ge=0)] = 1e-5
    l2: Annotated[float, Field(ge=0)] = 1e-5
    patience: PositiveInt = 10
    # Which epoch's weights every training stage keeps: val_accuracy (the best validation
    # accuracy, what is reported; ties: the lower validation loss), val_loss, or last (no
    # early stopping). Early stopping follows the same rule.
    keep_epoch: Literal["val_accuracy", "val_loss", "last"] = "val_accuracy"
    # Where training runs (foodtransfer.training.distribute): one device, all GPUs, or
    # several machines.
    strategy: StrategyName = "auto"
    # float16 compute with float32 variables and softmax: auto (on GPUs of compute capability
    # 7.0 or more, float32 elsewhere), true (on any GPU; ignored on CPU) or false.
    mixed_precision: bool | Literal["auto"] = "auto"
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    baseline: BaselineConfig = BaselineConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    mlflow: MlflowConfig = MlflowConfig()


# ---------------------------------------------------------------------- cross-field checks
def _check_cross_fields(params: Params) -> None:
    if params.backbone not in BACKBONES:
        raise ConfigError(
            f"params: backbone = {params.backbone!r} is not a known backbone: choose one of "
            f"{', '.join(BACKBONES)}. {FIX_HINT.format(key='backbone')}")
    weights = params.weights
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ConfigError(
            f"params: weights = {weights!r} is neither 'imagenet', 'none' nor an existing "
            f"weights file (looked for {Path(weights).resolve()}). "
            f"{FIX_HINT.format(key='weights')}")
    name = params.mlflow.registered_model
    if name != name.strip() or any(c in name for c in "/:@'\""):
        raise ConfigError(
            f"params: mlflow.registered_model = {name!r} is not a usable model registry name: "
            "no '/', ':', '@' (models:/<name>@<alias> URIs use them), quotes, or leading or "
            f"trailing spaces. {FIX_HINT.format(key='mlflow.registered_model')}")
    side = int(round(params.image_size * params.features.crop))
    if params.features.crop < 1 and side < 32:
        raise ConfigError(
            f"params: features.crop = {params.features.crop} leaves the backbone {side} px of "
            f"the {params.image_size} px images; it needs at least 32. Raise features.crop or "
            "image_size.")
    tune = params.finetune
    if tune.views and (tune.augment or not tune.cache_frozen):
        raise ConfigError(
            f"params: finetune.views = {tune.views} needs finetune.cache_frozen = true and "
            "finetune.augment = false: the views are cached outputs of the frozen bottom. Set "
            "finetune.views=0 to fine-tune with full passes and on-the-fly augmentation.")
    data = params.data
    if data.sample.min_side > data.sample.max_side:
        raise ConfigError(
            f"params: data.sample.min_side = {data.sample.min_side} is larger than "
            f"data.sample.max_side = {data.sample.max_side}; min_side must be <= max_side.")
    if isinstance(data.classes, list):
        if len(set(data.classes)) != len(data.classes):
            duplicates = sorted({c for c in data.classes if data.classes.count(c) > 1})
            raise ConfigError(f"params: data.classes lists {duplicates} more than once.")
        if len(data.classes) < 2:
            raise ConfigError(
                f"params: data.classes = {data.classes!r} needs at least 2 classes to classify.")
        unknown = [c for c in data.classes if c not in food101.CLASSES]
        if unknown:
            suggestions = {c: difflib.get_close_matches(c, food101.CLASSES, n=1) for c in unknown}
            hints = "; ".join(f"{c!r} (did you mean {s[0]!r}?)" if s else repr(c)
                              for c, s in suggestions.items())
            raise ConfigError(
                f"params: data.classes has classes that Food-101 does not have: {hints}. "
                f"Known classes: {', '.join(food101.CLASSES)}, or 'all'.")
    scheme = data.url.split("://", 1)[0].lower() if "://" in data.url else ""
    if data.source == "food101" and scheme not in ("http", "https", "file"):
        raise ConfigError(
            f"params: data.url = {data.url!r} is not an http://, https:// or file:// URL. "
            f"{FIX_HINT.format(key='data.url')}")
    if data.md5 is not None and (len(data.md5) != 32 or any(c not in "0123456789abcdef"
                                                             for c in data.md5.lower())):
        raise ConfigError(
            f"params: data.md5 = {data.md5!r} is not an md5 hex digest (32 hex digits) or null. "
            f"{FIX_HINT.format(key='data.md5')}")


# --------------------------------------------------------------------------------- loading
def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping into :class:`Params`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: the file must hold a mapping of keys, not {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except pydantic.ValidationError as error:
        raise translate(error, raw, Params) from None
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
    params = parse_params(raw)
    if os.environ.get(RECORD_PARAMS_ENV):
        record_reads(params)
    return params


def check_weights_folder(weights: str, folder: Path) -> None:
    """A local weights file must lie in ``folder`` (the stage's ``--weights-folder``, a DVC
    dependency), so that replacing it re-runs the stages that read it."""
    if weights in ("imagenet", "none"):
        return
    if Path(folder).resolve() not in Path(weights).resolve().parents:
        name = Path(weights).name
        raise ConfigError(
            f"params: weights = {weights!r} is outside the project's {folder}/ folder, where "
            "DVC sees a local weights file (a dependency of the stages that read it: replace "
            f"the file and they re-run). Copy it there, track it with 'dvc add {folder}/{name}' "
            f"(queued experiments get it from DVC) and set weights = {folder}/{name}.")


def flatten(params: Section) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` pairs (for MLflow params)."""
    flat: dict[str, Any] = {}

    def walk(values: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                flat[f"{prefix}{key}"] = ",".join(map(str, value))
            else:
                flat[f"{prefix}{key}"] = value

    walk(params.model_dump(), "")
    return flat
