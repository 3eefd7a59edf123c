"""The augmented-view caches: views are seeded and of the right shape; validation and test
features are never augmented (only mirrored, with TTA); and fine-tuning on the cached bottom's
output of a view gives what full passes over the same view give."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from foodtransfer.data.augment import (augmented_view, augmented_views, center_crop, crop_size,
                                       flip, view_transform)
from foodtransfer.data.images import ImageStoreWriter
from foodtransfer.data.manifests import load_splits
from foodtransfer.models.classifiers import (build_feature_extractor, build_head,
                                             build_image_classifier, get_backbone_model,
                                             split_frozen_bottom, unfreeze_top)
from foodtransfer.models.inference import predict_array
from foodtransfer.stages.features import extract_features, feature_files

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

IMAGE, SIZE = 40, 32  # stored images, backbone input (crop 0.8)


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE, IMAGE, 3), np.uint8)


# ----------------------------------------------------------------------------------- views
def test_views_are_seeded_sized_and_differ() -> None:
    images = random_images(3)
    indices = np.array([5, 9, 11])
    first = augmented_views(images, indices, SIZE, seed=42, view=1)
    assert first.shape == (3, SIZE, SIZE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augmented_views(images, indices, SIZE, 42, 1))
    # Each image's view depends on its store index, not on its batch or position.
    np.testing.assert_array_equal(first[1], augmented_view(images[1], SIZE, 42, 9, 1))
    assert not np.array_equal(first, augmented_views(images, indices, SIZE, 43, 1))
    assert not np.array_equal(first, augmented_views(images, indices, SIZE, 42, 2))
    assert not np.array_equal(first, augmented_views(images, indices + 1, SIZE, 42, 1))
    plain = center_crop(images, SIZE)
    assert not np.array_equal(first, plain)  # a view is not the plain crop


def test_centre_crop_and_flip() -> None:
    images = random_images(2)
    crop = center_crop(images, SIZE)
    offset = (IMAGE - SIZE) // 2
    np.testing.assert_array_equal(crop, images[:, offset:offset + SIZE, offset:offset + SIZE])
    np.testing.assert_array_equal(flip(crop)[:, :, 0], crop[:, :, -1])
    assert crop_size(256, 0.875) == 224 and crop_size(40, 0.8) == SIZE
    # The deployed model's CenterCrop layer takes the same pixels.
    layer = keras.layers.CenterCrop(SIZE, SIZE)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images.astype("float32"))),
                                  crop.astype("float32"))


# --------------------------------------------------------------------------- feature cache
@pytest.fixture(scope="module")
def trimmed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trimmed store and split manifests: 6 train, 3 val (train store), 4 test."""
    root = tmp_path_factory.mktemp("augment")
    for store, count in (("train", 9), ("test", 4)):
        with ImageStoreWriter(root / f"{store}.npy", IMAGE) as writer:
            for image in random_images(count, seed=len(store)):
                writer.append(image)
    rows = {"train": ("train", range(6)), "val": ("train", range(6, 9)),
            "test": ("test", range(4))}
    for name, (store, indices) in rows.items():
        pd.DataFrame({"store": store, "index": list(indices),
                      "image_id": [f"{name}/{i}" for i in indices],
                      "class_name": "a", "label": [i % 2 for i in indices]}).to_csv(
            root / f"{name}.csv", index=False)
    (root / "classes.json").write_text(json.dumps(["a", "b"]))
    return root


@pytest.fixture(scope="module")
def extractor(standin_weights):
    keras.utils.set_random_seed(1)
    return build_feature_extractor("MobileNetV2", str(standin_weights), SIZE)


def features_of(extractor, images: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(extractor(images.astype("float32"), training=False))


def store_images(trimmed: Path, split) -> np.ndarray:
    return np.load(trimmed / f"{split.stores[0]}.npy")[split.indices]


@pytest.mark.parametrize("tta", [False, True])
def test_feature_cache_augments_only_training_images(trimmed: Path, extractor, tmp_path: Path,
                                                     tta: bool) -> None:
    splits = load_splits(trimmed)
    files = feature_files(splits, IMAGE, SIZE, views=2, tta=tta, seed=42)
    out = tmp_path / "features"
    extract_features(extractor, trimmed, files, out, metadata={}, show_progress=False)
    expected = {"train", "val", "test", "train_views"} | ({"val_flip", "test_flip"} if tta
                                                         else set())
    assert {path.stem for path in out.glob("*.npy")} == expected
    scale = 1.0
    for name in ("train", "val", "test"):
        images = store_images(trimmed, splits[name])
        plain = features_of(extractor, center_crop(images, SIZE))
        scale = float(np.abs(plain).max())
        np.testing.assert_allclose(np.load(out / f"{name}.npy") / scale, plain / scale,
                                   atol=1e-4)
        if tta and name != "train":
            mirrored = features_of(extractor, flip(center_crop(images, SIZE)))
            np.testing.assert_allclose(np.load(out / f"{name}_flip.npy") / scale,
                                       mirrored / scale, atol=1e-4)
    train = splits["train"]
    images = store_images(trimmed, train)
    views = np.load(out / "train_views.npy")
    assert views.shape == (2 * len(train), extractor.output_shape[-1])
    for view in (1, 2):  # view by view, each row its image's view
        augmented = augmented_views(images, train.indices, SIZE, 42, view)
        rows = views[(view - 1) * len(train):view * len(train)]
        np.testing.assert_allclose(rows / scale, features_of(extractor, augmented) / scale,
                                   atol=1e-4)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"]["train_views"] == 2 * len(train)


def test_the_same_seed_gives_the_same_cache(trimmed: Path, extractor, tmp_path: Path) -> None:
    splits = load_splits(trimmed)
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        extract_features(extractor, trimmed, feature_files(splits, IMAGE, SIZE, views=1,
                                                           seed=seed),
                         tmp_path / name, metadata={}, show_progress=False)
    a, b, c = (np.load(tmp_path / name / "train_views.npy") for name in "abc")
    np.testing.assert_array_equal(a, b)
    # Random-weight features are tiny (~1e-13): compare relative to their scale.
    assert np.abs(a - c).max() > 1e-2 * np.abs(a).max()


# ----------------------------------------------------------- fine-tune on the cached bottom
def test_cached_finetune_matches_full_passes_on_the_same_views(trimmed: Path, tmp_path: Path,
                                                               standin_weights: Path) -> None:
    """The finetune stage's cache of a view's frozen-bottom output, through the trainable top,
    gives the full image model's probabilities on that same view (to 1e-4)."""
    from foodtransfer.stages.finetune import bottom_pass, top_model, write_bottom_cache
    from foodtransfer.training.distribute import make_strategy

    keras.utils.set_random_seed(2)
    splits = load_splits(trimmed)
    extractor = build_feature_extractor("MobileNetV2", str(standin_weights), SIZE)
    head = build_head(extractor.output_shape[-1], 2)
    model = build_image_classifier(extractor, head, image_size=IMAGE, tta=True)
    unfreeze_top(get_backbone_model(model), 5)
    bottom, top = split_frozen_bottom(get_backbone_model(model))
    write_bottom_cache(*bottom_pass(model, bottom, top), trimmed, splits, tmp_path, views=2,
                       seed=42)
    trainable = top_model(model, top, make_strategy("auto"))
    cache = np.load(tmp_path / "train.npy")
    train = splits["train"]
    assert len(cache) == 3 * len(train)  # the plain image, then 2 views
    images = store_images(trimmed, train)
    plain = center_crop(images, SIZE)
    for view, inputs in enumerate([plain] + [augmented_views(images, train.indices, SIZE, 42, v)
                                             for v in (1, 2)]):
        rows = cache[view * len(train):(view + 1) * len(train)]
        full = keras.ops.convert_to_numpy(head(extractor(inputs.astype("float32"))))
        np.testing.assert_allclose(predict_array(trainable, rows), full, atol=1e-4)
    val = np.load(tmp_path / "val.npy")
    full_val = keras.ops.convert_to_numpy(head(extractor(
        center_crop(store_images(trimmed, splits["val"]), SIZE).astype("float32"))))
    np.testing.assert_allclose(predict_array(trainable, val), full_val, atol=1e-4)


def test_view_transform_reads_like_the_function() -> None:
    images = random_images(2)
    transform = view_transform(SIZE, 42, 3)
    np.testing.assert_array_equal(transform(images, np.array([4, 8])),
                                  augmented_views(images, np.array([4, 8]), SIZE, 42, 3))


# ------------------------------------------- the fine-tune's cache, from the features' passes
def test_features_stage_writes_the_finetune_cache_in_the_same_passes(
        trimmed: Path, tmp_path: Path, standin_weights: Path) -> None:
    """With a frozen-bottom cache, the features are the same, every image the two caches share
    goes through the backbone once, and each cached row is the bottom's output for its image
    and view."""
    from foodtransfer.models.classifiers import frozen_bottom_cut
    from foodtransfer.stages.features import BottomCache, bottom_files

    keras.utils.set_random_seed(3)
    extractor = build_feature_extractor("MobileNetV2", str(standin_weights), SIZE)
    unfreeze_top(get_backbone_model(extractor), 5)
    cut_bottom, cut_top = frozen_bottom_cut(extractor,
                                            *split_frozen_bottom(get_backbone_model(extractor)))
    splits = load_splits(trimmed)
    files = feature_files(splits, IMAGE, SIZE, views=1, tta=True, seed=42)
    cache = BottomCache(cut_bottom, cut_top,
                        bottom_files(splits, IMAGE, SIZE, views=2, tta=True, seed=42),
                        tmp_path / "bottom", {"what": "test"})
    shared = extract_features(extractor, trimmed, files, tmp_path / "features", metadata={},
                              show_progress=False, bottom=cache)
    alone = extract_features(extractor, trimmed, files, tmp_path / "alone", metadata={},
                             show_progress=False)
    train, val, test = (len(splits[name]) for name in ("train", "val", "test"))
    # train: plain + 2 views; val and test: plain + mirror. Apart: 26 + 32 passes.
    assert shared.images == 3 * train + 2 * val + 2 * test
    assert alone.images == 2 * train + 2 * val + 2 * test
    for path in (tmp_path / "alone").glob("*.npy"):
        expected = np.load(path)
        np.testing.assert_allclose(np.load(tmp_path / "features" / path.name),
                                   expected, atol=1e-5 * np.abs(expected).max())

    def bottom_of(images: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(cut_bottom(images.astype("float32")))

    out = tmp_path / "bottom"
    assert {path.stem for path in out.glob("*.npy")} == {"train", "val", "test", "val_flip",
                                                         "test_flip"}
    images = store_images(trimmed, splits["train"])
    rows = np.load(out / "train.npy")
    assert rows.shape == (3 * train, *cut_bottom.output_shape[1:])
    for view, inputs in enumerate([center_crop(images, SIZE)] + [
            augmented_views(images, splits["train"].indices, SIZE, 42, v) for v in (1, 2)]):
        expected = bottom_of(inputs)
        np.testing.assert_allclose(rows[view * train:(view + 1) * train], expected,
                                   atol=1e-5 * np.abs(expected).max())
    for name in ("val", "test"):
        plain = center_crop(store_images(trimmed, splits[name]), SIZE)
        for file, inputs in ((name, plain), (f"{name}_flip", flip(plain))):
            expected = bottom_of(inputs)
            np.testing.assert_allclose(np.load(out / f"{file}.npy"), expected,
                                       atol=1e-5 * np.abs(expected).max())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cached"] is True and meta["what"] == "test"
    assert meta["files"] == {"train": 3 * train, "val": val, "test": test, "val_flip": val,
                             "test_flip": test}


def test_finetune_takes_the_features_stage_cache_only_when_it_is_its_own(trimmed: Path,
                                                                         tmp_path: Path,
                                                                         standin_weights: Path
                                                                         ) -> None:
    """The features stage's run writes the cache; a dropout model built as the transfer stage
    builds it (same seed) accepts it and is evaluated from it exactly as from the images;
    other views, another backbone or no cache are refused, saying why."""
    from foodtransfer.config import Params
    from foodtransfer.models.inference import compile_forward, predict_split
    from foodtransfer.stages import features
    from foodtransfer.stages.finetune import (bottom_pass, cached_probabilities,
                                              features_stage_cache, top_model)
    from foodtransfer.training.distribute import make_strategy

    raw = {"backbone": "MobileNetV2", "weights": str(standin_weights), "image_size": IMAGE,
           "features": {"crop": SIZE / IMAGE, "views": 1, "tta": True},
           "finetune": {"unfreeze": 5, "views": 2}}
    params = Params.model_validate(raw)
    splits = load_splits(trimmed)
    out = tmp_path / "bottom"
    features.run(params, trimmed, trimmed, tmp_path / "features", tmp_path / "features.json",
                 out)

    def dropout_model(seed: int, weights: str = str(standin_weights)):
        keras.utils.set_random_seed(seed)  # the transfer stage seeds with data.seed
        extractor = build_feature_extractor("MobileNetV2", weights, SIZE)
        model = build_image_classifier(extractor, build_head(extractor.output_shape[-1], 2),
                                       image_size=IMAGE, tta=True)
        unfreeze_top(get_backbone_model(model), 5)
        return model, split_frozen_bottom(get_backbone_model(model))

    model, (bottom, top) = dropout_model(params.data.seed)
    forward, plain = bottom_pass(model, bottom, top)
    ok, why = features_stage_cache(out, forward, plain, bottom, params, trimmed, trimmed,
                                   splits)
    assert ok, why
    probabilities = cached_probabilities(top_model(model, top, make_strategy("auto")), out,
                                         tta=True)
    image_forward = compile_forward(model)
    for name in ("val", "test"):
        np.testing.assert_allclose(probabilities[name],
                                   predict_split(image_forward, trimmed, splits[name]),
                                   atol=1e-5)

    other_views = Params.model_validate({**raw, "finetune": {"unfreeze": 5, "views": 3}})
    ok, why = features_stage_cache(out, forward, plain, bottom, other_views, trimmed, trimmed,
                                   splits)
    assert not ok and "views 2 (now 3)" in why and "dvc repro features" in why
    other, (other_bottom, other_top) = dropout_model(7, "none")  # another backbone
    ok, why = features_stage_cache(out, *bottom_pass(other, other_bottom, other_top),
                                   other_bottom, params, trimmed, trimmed, splits)
    assert not ok and "differs from this model's own frozen bottom" in why
    no_cache = Params.model_validate({**raw, "finetune": {"unfreeze": 5, "views": 0,
                                                          "cache_frozen": False}})
    features.run(no_cache, trimmed, trimmed, tmp_path / "features2", tmp_path / "f2.json",
                 tmp_path / "none")
    assert json.loads((tmp_path / "none" / "meta.json").read_text())["cached"] is False
    ok, why = features_stage_cache(tmp_path / "none", forward, plain, bottom, params, trimmed,
                                   trimmed, splits)
    assert not ok and "finetune.cache_frozen is false" in why
