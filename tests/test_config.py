"""params.yaml validation: defaults, typos, types, ranges and cross-field checks, with messages
that name the key, the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from foodtransfer.data import food101
from foodtransfer.config import (
    BACKBONES,
    check_weights_folder,
    DEFAULT_CLASSES,
    FOOD101_MD5,
    FOOD101_URL,
    BaselineConfig,
    DataConfig,
    FeaturesConfig,
    FinetuneConfig,
    MlflowConfig,
    Params,
    SampleConfig,
    flatten,
    load_params,
    parse_params,
)
from foodtransfer.errors import ConfigError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def config_error(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return str(info.value)


# ------------------------------------------------------------------------------ defaults

def test_empty_mapping_gives_the_defaults() -> None:
    params = parse_params({})
    assert params == Params()
    assert params.seed == 42 and params.image_size == 256
    assert params.backbone == "EfficientNetV2B0" and params.weights == "imagenet"
    assert params.dropout == 0.6 and params.epochs == 100 and params.optimizer == "nadam"
    assert params.data.source == "food101"
    assert params.data.url == FOOD101_URL and params.data.md5 == FOOD101_MD5
    assert params.data.classes == DEFAULT_CLASSES and len(DEFAULT_CLASSES) == 20
    assert params.data.samples_per_class == 256 and params.data.test_per_class == 100
    assert params.data.val_fraction == 0.2 and params.data.allow_fewer is False
    assert params.data.sample == SampleConfig()
    assert params.finetune.unfreeze == 30 and params.baseline.image_size == 128


def test_none_is_treated_as_an_empty_file() -> None:
    assert parse_params(None) == Params()


def test_a_non_mapping_file_is_rejected() -> None:
    message = config_error([1, 2, 3])
    assert "mapping" in message and "list" in message


def test_the_repository_params_yaml_loads() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.backbone in BACKBONES
    assert all(c in food101.CLASSES for c in params.data.classes)
    assert 0 < params.data.val_fraction < 1


def test_load_params_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_load_params_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_load_params_reads_values(write_params) -> None:
    path = write_params({"seed": 5, "data": {"source": "sample", "classes": ["pizza", "sushi"]}})
    params = load_params(path)
    assert params.seed == 5
    assert params.data.source == "sample" and params.data.classes == ["pizza", "sushi"]
    # Keys not given keep their defaults, also inside a given section.
    assert params.data.val_fraction == 0.2 and params.dropout == 0.6


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------------------- unknown keys

def test_unknown_top_level_key_suggests_the_close_one() -> None:
    message = config_error({"dropuot": 0.5})
    assert "unknown key 'dropuot'" in message
    assert "Did you mean 'dropout'?" in message
    assert "Known keys here:" in message and "learning_rate" in message


def test_unknown_nested_key_names_the_full_path() -> None:
    message = config_error({"data": {"sampels_per_class": 10}})
    assert "unknown key 'data.sampels_per_class'" in message
    assert "Did you mean 'data.samples_per_class'?" in message
    assert "data.val_fraction" in message  # known keys are listed with their section


def test_unknown_key_two_levels_down() -> None:
    message = config_error({"data": {"sample": {"max_sid": 30}}})
    assert "'data.sample.max_sid'" in message and "'data.sample.max_side'" in message


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    message = config_error({"zzzzqqq": 1})
    assert "unknown key 'zzzzqqq'" in message
    assert "Did you mean" not in message


def test_a_section_given_as_a_scalar_is_rejected() -> None:
    message = config_error({"data": "food101"})
    assert "data = 'food101'" in message and "section" in message


# ------------------------------------------------------------------------------ wrong types

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"epochs": "ten"}, ["epochs = 'ten'", "wrong type", "an integer"]),
        ({"epochs": 2.5}, ["epochs = 2.5", "wrong type", "an integer"]),
        ({"epochs": True}, ["epochs = True", "wrong type", "an integer"]),
        ({"dropout": "high"}, ["dropout = 'high'", "wrong type", "a number"]),
        ({"data": {"classes": "pizza"}}, ["data.classes = 'pizza'", "wrong type",
                                          "a list of a string", "'all'"]),
        ({"data": {"classes": []}}, ["data.classes = []", "wrong type", "a list of a string"]),
        ({"data": {"classes": ["pizza", 3]}}, ["data.classes = ['pizza', 3]", "wrong type",
                                               "a list of a string"]),
        ({"data": {"allow_fewer": "yes"}}, ["data.allow_fewer = 'yes'", "true or false"]),
        ({"data": {"samples_per_class": "many"}}, ["data.samples_per_class = 'many'",
                                                   "wrong type", "an integer or 'all'"]),
        ({"optimizer": "adamw"}, ["optimizer = 'adamw'", "not allowed", "'nadam'", "'sgd'"]),
        ({"data": {"source": "kaggle"}}, ["data.source = 'kaggle'", "'food101'", "'sample'"]),
        ({"learning_rate": float("nan")}, ["learning_rate", "finite"]),
    ],
)
def test_wrong_types_name_key_value_and_expected_type(raw: dict, expected: list[str]) -> None:
    message = config_error(raw)
    for text in expected:
        assert text in message, (text, message)
    assert "dvc exp run -S" in message  # says how to fix it


def test_an_integer_is_accepted_for_a_float() -> None:
    params = parse_params({"learning_rate": 1, "dropout": 0})
    assert params.learning_rate == 1.0 and isinstance(params.learning_rate, float)
    assert params.dropout == 0.0


# ---------------------------------------------------------------------------- out of range

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"dropout": 1.5}, ["dropout = 1.5", "out of range", ">= 0", "< 1"]),
        ({"dropout": 1}, ["dropout = 1.0", "out of range", "< 1"]),
        ({"dropout": -0.1}, ["dropout = -0.1", "out of range", ">= 0"]),
        ({"epochs": -1}, ["epochs = -1", "out of range", ">= 1"]),
        ({"epochs": 0}, ["epochs = 0", "out of range", ">= 1"]),
        ({"data": {"val_fraction": 0}}, ["data.val_fraction = 0.0", "out of range", "> 0", "< 1"]),
        ({"data": {"val_fraction": 1}}, ["data.val_fraction = 1.0", "out of range", "> 0", "< 1"]),
        ({"data": {"samples_per_class": 0}}, ["data.samples_per_class = 0", "out of range",
                                              ">= 1"]),
        ({"image_size": 8}, ["image_size = 8", "out of range", ">= 16", "<= 1024"]),
        ({"data": {"sample": {"min_side": 2}}}, ["data.sample.min_side = 2", ">= 8"]),
    ],
)
def test_out_of_range_names_key_value_and_range(raw: dict, expected: list[str]) -> None:
    message = config_error(raw)
    for text in expected:
        assert text in message, (text, message)
    assert "wrong type" not in message


def test_range_bounds_themselves_are_accepted() -> None:
    params = parse_params({"dropout": 0, "epochs": 1, "image_size": 1024,
                           "data": {"val_fraction": 0.999, "samples_per_class": 1}})
    assert params.dropout == 0.0 and params.epochs == 1 and params.image_size == 1024
    assert params.data.val_fraction == 0.999


# ------------------------------------------------------------------------ cross-field checks

def test_unknown_class_is_named_with_a_suggestion() -> None:
    message = config_error({"data": {"classes": ["pizza", "piza"]}})
    assert "'piza' (did you mean 'pizza'?)" in message
    assert "Known classes:" in message and "apple_pie" in message and "'all'" in message


def test_duplicate_class_is_rejected() -> None:
    message = config_error({"data": {"classes": ["pizza", "sushi", "pizza"]}})
    assert "['pizza']" in message and "more than once" in message


def test_a_single_class_is_rejected() -> None:
    message = config_error({"data": {"classes": ["pizza"]}})
    assert "at least 2 classes" in message


def test_unknown_backbone_lists_the_known_ones() -> None:
    message = config_error({"backbone": "ResNet51"})
    assert "backbone = 'ResNet51'" in message
    for name in BACKBONES:
        assert name in message


def test_weights_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.weights.h5"
    message = config_error({"weights": str(missing)})
    assert f"weights = {str(missing)!r}" in message
    assert "'imagenet'" in message and "'none'" in message
    assert str(missing) in message


def test_weights_file_in_the_weights_folder_is_accepted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.weights.h5").write_bytes(b"\x89HDF")
    assert parse_params({"weights": "weights/model.weights.h5"}).weights == \
        "weights/model.weights.h5"
    for weights in ("weights/model.weights.h5", str(tmp_path / "weights" / "model.weights.h5"),
                    "none", "imagenet"):
        check_weights_folder(weights, Path("weights"))


def test_weights_file_outside_the_weights_folder_is_refused(tmp_path: Path,
                                                            monkeypatch) -> None:
    """DVC sees a local weights file only in weights/ (a dependency of the stages)."""
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "elsewhere" / "model.weights.h5"
    outside.parent.mkdir()
    outside.write_bytes(b"\x89HDF")
    with pytest.raises(ConfigError) as info:
        check_weights_folder(str(outside), Path("weights"))
    message = str(info.value)
    assert f"weights = {str(outside)!r} is outside the project's weights/ folder" in message
    assert "dvc add weights/model.weights.h5" in message
    assert "weights = weights/model.weights.h5" in message


def test_min_side_above_max_side_is_rejected() -> None:
    message = config_error({"data": {"sample": {"min_side": 100, "max_side": 50}}})
    assert "data.sample.min_side = 100" in message and "data.sample.max_side = 50" in message


def test_url_scheme_is_checked_for_food101() -> None:
    message = config_error({"data": {"url": "ftp://example.org/food-101.tar.gz"}})
    assert "data.url" in message and "file://" in message
    # The sample source never reads the URL.
    assert parse_params({"data": {"source": "sample", "url": "nonsense"}}).data.url == "nonsense"


@pytest.mark.parametrize("key", ["classes", "samples_per_class", "test_per_class"])
def test_all_is_accepted(key: str) -> None:
    params = parse_params({"data": {key: "all"}})
    assert getattr(params.data, key) == "all"


def test_all_is_accepted_for_finetune_unfreeze() -> None:
    assert parse_params({"finetune": {"unfreeze": "all"}}).finetune.unfreeze == "all"


def test_md5_null_is_accepted() -> None:
    assert parse_params({"data": {"md5": None}}).data.md5 is None


def test_md5_upper_case_hex_is_accepted() -> None:
    md5 = FOOD101_MD5.upper()
    assert parse_params({"data": {"md5": md5}}).data.md5 == md5


@pytest.mark.parametrize("md5", ["abc", "z" * 32, FOOD101_MD5 + "0"])
def test_bad_md5_is_rejected(md5: str) -> None:
    message = config_error({"data": {"md5": md5}})
    assert f"data.md5 = {md5!r}" in message
    assert "32 hex digits" in message and "null" in message


# ----------------------------------------------------------------------------------- flatten

def test_flatten_gives_flat_dotted_keys() -> None:
    params = parse_params({"data": {"classes": ["pizza", "sushi"], "val_fraction": 0.25}})
    flat = flatten(params)
    assert flat["data.val_fraction"] == 0.25
    assert flat["data.classes"] == "pizza,sushi"
    assert flat["data.sample.max_side"] == 400
    assert flat["finetune.lr_scale"] == 0.3 and flat["features.tta"] is True
    assert flat["dropout"] == 0.6 and flat["seed"] == 42
    assert flat["mlflow.experiment"] == "food101-transfer"
    assert flat["data.md5"] == FOOD101_MD5
    # Only leaves: no section is a value, every value is a scalar.
    assert "data" not in flat and "data.sample" not in flat
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in flat.values())


def test_flatten_covers_every_field() -> None:
    flat = flatten(Params())
    sections = {"data": DataConfig, "features": FeaturesConfig, "baseline": BaselineConfig,
                "finetune": FinetuneConfig, "mlflow": MlflowConfig}
    n_leaves = (len(Params.model_fields) - len(sections)
                + sum(len(section.model_fields) for section in sections.values())
                - 1 + len(SampleConfig.model_fields))  # data.sample is a section too
    assert len(flat) == n_leaves
    assert flatten(parse_params({"data": {"classes": "all"}}))["data.classes"] == "all"


def test_the_old_fine_tune_section_points_to_finetune() -> None:
    message = config_error({"fine_tune": {"epochs": 3}})
    assert "unknown key 'fine_tune'" in message and "Did you mean 'finetune'?" in message


def test_a_value_of_the_right_type_in_a_union_is_range_checked() -> None:
    message = config_error({"finetune": {"unfreeze": 0}})
    assert "finetune.unfreeze = 0" in message and "out of range" in message and ">= 1" in message
    assert parse_params({"finetune": {"unfreeze": 12}}).finetune.unfreeze == 12


def test_a_crop_too_small_for_the_backbone_is_refused() -> None:
    message = config_error({"image_size": 64, "features": {"crop": 0.4}})
    assert "features.crop = 0.4 leaves the backbone 26 px" in message and "at least 32" in message
    assert parse_params({"image_size": 256, "features": {"crop": 0.875}}).features.crop == 0.875


def test_finetune_views_need_the_frozen_bottom_cache() -> None:
    message = config_error({"finetune": {"views": 4, "augment": True}})
    assert "finetune.views = 4 needs finetune.cache_frozen = true" in message
    message = config_error({"finetune": {"views": 2, "cache_frozen": False}})
    assert "finetune.views=0" in message
    assert parse_params({"finetune": {"views": 4}}).finetune.views == 4
