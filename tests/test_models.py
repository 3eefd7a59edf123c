"""Backbone registry and preprocessing, the classifier head, unfreezing for fine-tuning, and a
smoke test of every model builder: predict, compile, evaluate, one training step.

Everything runs on random weights (``weights="none"``) at 32 px, so no download is needed."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from foodtransfer import config
from foodtransfer.errors import UserError
from foodtransfer.models.backbones import (CAFFE_MEANS_BGR, build_backbone, check_backbone,
                                           preprocess_layer)
from foodtransfer.models.classifiers import (
    build_baseline,
    build_feature_extractor,
    build_head,
    build_image_classifier,
    get_backbone_model,
    parameter_counts,
    unfreeze_top,
)
from foodtransfer.training.loop import compile_classifier, make_optimizer

# Keras' own weight saving trips numpy 2's __array__(copy=...) deprecation, once per variable.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SIZE = 32
CLASSES = 3
BN = keras.layers.BatchNormalization


def numpy_weights(variables) -> dict[str, np.ndarray]:
    weights = {v.path: keras.ops.convert_to_numpy(v).copy() for v in variables}
    assert len(weights) == len(variables)  # paths are unique: nothing compared is hidden
    return weights


def random_images(n: int = 4, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def random_labels(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CLASSES, n).astype("int64")


def non_input_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def assert_probabilities(probabilities: np.ndarray, n: int) -> None:
    assert probabilities.shape == (n, CLASSES)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    keras.utils.set_random_seed(1234)


# ----------------------------------------------------------------------- backbone registry

def test_unknown_backbone_is_a_user_error_listing_the_known_ones() -> None:
    with pytest.raises(UserError) as info:
        check_backbone("Nope")
    message = str(info.value)
    assert "'Nope'" in message
    for name in config.BACKBONES:
        assert name in message
    with pytest.raises(UserError):
        build_backbone("Nope", "none", SIZE)


def test_mobilenet_preprocessing_maps_0_255_to_minus1_1() -> None:
    layer = preprocess_layer("MobileNetV2")
    assert isinstance(layer, keras.layers.Rescaling)
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    out = keras.ops.convert_to_numpy(layer(pixels))
    np.testing.assert_allclose(out, [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)


@pytest.mark.parametrize("name", ["ResNet50", "VGG16"])
def test_caffe_preprocessing_is_bgr_minus_imagenet_means(name: str) -> None:
    layer = preprocess_layer(name)
    assert layer is not None and not layer.trainable
    rgb = np.array([[[[10.0, 20.0, 30.0], [255.0, 0.0, 128.0]],
                     [[0.0, 0.0, 0.0], [1.5, 200.25, 77.0]]]], dtype="float32")
    out = keras.ops.convert_to_numpy(layer(rgb))
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    expected = np.stack([b - 103.939, g - 116.779, r - 123.68], axis=-1)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # Same as Keras' own "caffe" preprocessing for these backbones.
    reference = keras.applications.imagenet_utils.preprocess_input(rgb.copy(), mode="caffe")
    np.testing.assert_allclose(out, reference, atol=1e-4)


@pytest.mark.parametrize("name", ["EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetB0",
                                  "EfficientNetB3", "ConvNeXtTiny"])
def test_builtin_preprocessing_backbones_add_no_layer(name: str) -> None:
    assert config.BACKBONES[name] == "builtin"
    assert preprocess_layer(name) is None


def test_efficientnetv2_model_includes_its_preprocessing() -> None:
    model = build_backbone("EfficientNetV2B0", "none", SIZE)
    kinds = {type(layer) for layer in model.layers}
    assert kinds & {keras.layers.Rescaling, keras.layers.Normalization}
    extractor = build_feature_extractor("EfficientNetV2B0", "none", SIZE)
    # ... and the extractor does not preprocess a second time.
    assert "preprocess" not in [layer.name for layer in extractor.layers]


def assert_close_relative(actual: np.ndarray, expected: np.ndarray) -> None:
    """Random-weight backbones give features of any scale (MobileNetV2's are ~1e-12 at 32 px):
    compare relative to the largest one."""
    scale = float(np.abs(expected).max())
    assert scale > 0 and np.count_nonzero(expected) > expected.size // 4
    np.testing.assert_allclose(actual / scale, expected / scale, atol=1e-4)


def test_extractor_applies_the_backbone_preprocessing_before_the_backbone(
        vgg16_extractor: keras.Model) -> None:
    images = random_images(2)
    mobilenet = build_feature_extractor("MobileNetV2", "none", SIZE)
    base = get_backbone_model(mobilenet)
    expected = keras.ops.convert_to_numpy(base(images / 127.5 - 1.0, training=False)).mean((1, 2))
    assert_close_relative(keras.ops.convert_to_numpy(mobilenet(images)), expected)
    # The comparison does tell preprocessings apart.
    unscaled = keras.ops.convert_to_numpy(base(images / 255.0, training=False)).mean((1, 2))
    with pytest.raises(AssertionError):
        assert_close_relative(unscaled, expected)

    vgg = vgg16_extractor
    caffe = images[..., ::-1] - np.array(CAFFE_MEANS_BGR, dtype="float32")
    expected = keras.ops.convert_to_numpy(get_backbone_model(vgg)(caffe)).mean((1, 2))
    assert_close_relative(keras.ops.convert_to_numpy(vgg(images)), expected)
    rgb_order = images - np.array(CAFFE_MEANS_BGR, dtype="float32")
    with pytest.raises(AssertionError):
        assert_close_relative(
            keras.ops.convert_to_numpy(get_backbone_model(vgg)(rgb_order)).mean((1, 2)), expected)


def test_missing_weights_file_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.weights.h5"
    with pytest.raises(UserError, match="no such file"):
        build_backbone("MobileNetV2", str(missing), SIZE)


def test_weights_file_is_loaded(tmp_path: Path) -> None:
    source = keras.applications.MobileNetV2(include_top=False, weights=None,
                                            input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "x.weights.h5"
    source.save_weights(path)
    saved = [keras.ops.convert_to_numpy(w) for w in source.weights]

    keras.utils.set_random_seed(777)  # a different random init, overwritten by the file
    loaded = build_backbone("MobileNetV2", str(path), SIZE)
    fresh = build_backbone("MobileNetV2", "none", SIZE)
    assert len(loaded.weights) == len(saved)
    for weight, expected in zip(loaded.weights, saved):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), expected)
    # The comparison can fail: a random build does differ from the saved weights.
    assert not np.array_equal(keras.ops.convert_to_numpy(fresh.weights[0]), saved[0])


def test_weights_file_of_another_model_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "head.weights.h5"
    build_head(8, CLASSES).save_weights(path)
    with pytest.warns(UserWarning):  # Keras warns about every container it cannot match
        with pytest.raises(UserError, match="could not load weights file") as info:
            build_backbone("MobileNetV2", str(path), SIZE)
    assert "include_top=False" in str(info.value)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
def test_imagenet_weights_offline_is_a_user_error_with_a_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic offline: an empty Keras cache, and the download pointed at a file:// URL
    that does not exist (so no network is touched whatever the machine)."""
    import keras.src.applications.mobilenet_v2 as keras_mobilenet_v2
    import keras.src.backend.config as keras_config

    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    # Keras reads KERAS_HOME once at import: point its cache at the empty folder too.
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(keras_home))
    monkeypatch.setattr(keras_mobilenet_v2, "BASE_WEIGHT_PATH",
                        (tmp_path / "unreachable").as_uri() + "/")

    with pytest.raises(UserError) as info:
        build_backbone("MobileNetV2", "imagenet", SIZE)
    message = str(info.value)
    assert "ImageNet weights of MobileNetV2" in message
    assert str(keras_home / "models") in message  # where Keras caches the download
    assert "weights" in message and "'none'" in message  # how to do without it
    assert info.value.__cause__ is not None
    assert list((keras_home / "models").iterdir()) == []  # no partial download left


# -------------------------------------------------------------------------------- the head

def test_head_without_dropout_or_regulariser() -> None:
    head = build_head(16, CLASSES)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in head.layers)
    dense = head.get_layer("classifier")
    assert dense.kernel_regularizer is None
    assert head.losses == []


def test_head_with_dropout_and_l1l2() -> None:
    head = build_head(16, CLASSES, dropout=0.5, l1=1e-4, l2=1e-3)
    dropouts = [layer for layer in head.layers if isinstance(layer, keras.layers.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].rate == pytest.approx(0.5)
    regularizer = head.get_layer("classifier").kernel_regularizer
    assert isinstance(regularizer, keras.regularizers.L1L2)
    assert regularizer.l1 == pytest.approx(1e-4)
    assert regularizer.l2 == pytest.approx(1e-3)
    # The penalty the model adds to the loss is l1 * sum|w| + l2 * sum w^2.
    kernel = keras.ops.convert_to_numpy(head.get_layer("classifier").kernel)
    head(np.zeros((1, 16), "float32"))
    penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in head.losses)
    assert penalty == pytest.approx(1e-4 * np.abs(kernel).sum() + 1e-3 * (kernel ** 2).sum(),
                                    rel=1e-4)


def test_head_with_only_l2_still_regularises() -> None:
    regularizer = build_head(16, CLASSES, l2=1e-3).get_layer("classifier").kernel_regularizer
    assert isinstance(regularizer, keras.regularizers.L1L2)
    assert regularizer.l1 == 0 and regularizer.l2 == pytest.approx(1e-3)


def test_head_outputs_probabilities_and_dropout_only_in_training() -> None:
    head = build_head(16, CLASSES, dropout=0.5)
    x = np.random.default_rng(0).normal(size=(5, 16)).astype("float32") * 3
    first = keras.ops.convert_to_numpy(head(x, training=False))
    assert_probabilities(first, 5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(head(x, training=False)), first)
    assert not np.allclose(keras.ops.convert_to_numpy(head(x, training=True)), first)


# --------------------------------------------------------------------------------- unfreeze

def test_frozen_extractor_has_no_trainable_weights(vgg16_extractor: keras.Model) -> None:
    for extractor in (build_feature_extractor("MobileNetV2", "none", SIZE), vgg16_extractor):
        assert extractor.trainable_weights == []
        total, trainable = parameter_counts(extractor)
        assert trainable == 0 and total > 0


@pytest.mark.parametrize("count", [10, 11])  # MobileNetV2's 10th layer from the top is a BN
def test_unfreeze_top_layers_keeps_batchnorm_frozen(count: int) -> None:
    extractor = build_feature_extractor("MobileNetV2", "none", SIZE)
    backbone = get_backbone_model(extractor)
    assert backbone.name == "backbone"
    layers = non_input_layers(backbone)
    made_trainable = unfreeze_top(backbone, count)

    top, bottom = layers[-count:], layers[:-count]
    expected = [layer for layer in top if not isinstance(layer, BN)]
    assert any(isinstance(layer, BN) for layer in top)  # the check below is not vacuous
    assert [layer for layer in layers if layer.trainable] == expected
    assert made_trainable == len(expected)
    assert not any(layer.trainable for layer in bottom)
    assert not any(layer.trainable for layer in layers if isinstance(layer, BN))
    # Trainable weights are exactly the kernels/biases of the unfrozen top layers.
    expected_paths = {w.path for layer in expected for w in layer.trainable_weights}
    assert {w.path for w in extractor.trainable_weights} == expected_paths
    assert expected_paths  # Conv_1 at least has a kernel


def test_unfreeze_all_makes_every_non_batchnorm_layer_trainable() -> None:
    backbone = get_backbone_model(build_feature_extractor("MobileNetV2", "none", SIZE))
    layers = non_input_layers(backbone)
    made_trainable = unfreeze_top(backbone, "all")
    non_bn = [layer for layer in layers if not isinstance(layer, BN)]
    assert made_trainable == len(non_bn)
    assert all(layer.trainable for layer in non_bn)
    assert not any(layer.trainable for layer in layers if isinstance(layer, BN))
    # More than there are layers is the same as all.
    other = get_backbone_model(build_feature_extractor("MobileNetV2", "none", SIZE))
    assert unfreeze_top(other, 10_000) == made_trainable


def test_unfreezing_grows_the_trainable_parameters_of_the_classifier() -> None:
    extractor = build_feature_extractor("MobileNetV2", "none", SIZE)
    head = build_head(extractor.output_shape[-1], CLASSES)
    model = build_image_classifier(extractor, head)
    total, frozen_trainable = parameter_counts(model)
    head_params = sum(int(np.prod(w.shape)) for w in head.weights)
    assert frozen_trainable == head_params

    unfreeze_top(get_backbone_model(model), 10)
    total_after, trainable_10 = parameter_counts(model)
    assert total_after == total
    assert trainable_10 > frozen_trainable
    unfreeze_top(get_backbone_model(model), "all")
    assert parameter_counts(model)[1] > trainable_10


def test_get_backbone_model_finds_it_through_crop_and_tta() -> None:
    extractor = build_feature_extractor("MobileNetV2", "none", SIZE)
    model = build_image_classifier(extractor, build_head(extractor.output_shape[-1], CLASSES),
                                   image_size=SIZE + 8, tta=True)
    assert get_backbone_model(model) is get_backbone_model(extractor)
    with pytest.raises(ValueError, match="no 'backbone' layer"):
        get_backbone_model(build_head(4, CLASSES))


# ------------------------------------------------------------------- smoke test per builder

def smoke(model: keras.Model, x: np.ndarray, y: np.ndarray
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predict -> compile -> evaluate -> one training step. Returns the weights (by path)
    before and after the step."""
    # (a) predict
    probabilities = model.predict(x, verbose=0)
    assert_probabilities(probabilities, len(x))
    # (b) compile
    compile_classifier(model, make_optimizer("adam", 1e-2), CLASSES)
    # (c) evaluate
    scores = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    assert np.isfinite(scores["loss"]) and scores["loss"] > 0
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert scores["top5"] == pytest.approx(1.0)  # 3 classes: top-5 is top-3
    # (d) one step
    before = numpy_weights(model.weights)
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = numpy_weights(model.weights)
    return before, after


def changed(before: dict, after: dict, paths) -> list[str]:
    """Paths whose value differs at all (for what must stay bit-for-bit frozen)."""
    return [p for p in paths if not np.array_equal(before[p], after[p])]


def learned(before: dict, after: dict, paths) -> list[str]:
    """Paths a real optimizer step moved (Adam moves each weight by about the learning rate,
    1e-3 or more here; float rounding alone moves them by < 1e-8)."""
    return [p for p in paths if np.abs(after[p] - before[p]).max() > 1e-5]


@pytest.mark.parametrize(("augment", "image_size"), [(False, SIZE), (True, SIZE), (False, 24)])
def test_baseline_smoke(augment: bool, image_size: int) -> None:
    model = build_baseline(CLASSES, image_size, input_size=SIZE, augment=augment, seed=3)
    names = [layer.name for layer in model.layers]
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert ("augmentation" in names) == augment
    assert ("resize" in names) == (image_size != SIZE)
    if image_size != SIZE:
        assert model.get_layer("resize").output.shape[1:3] == (image_size, image_size)
    x = random_images(4)
    # Augmentation and dropout are identities at inference.
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))

    before, after = smoke(model, x, random_labels(4))
    trainable = [w.path for w in model.trainable_weights]
    assert len(trainable) == 12  # 4 conv + 2 dense, kernel and bias each
    assert learned(before, after, trainable) == trainable


def test_head_smoke() -> None:
    head = build_head(16, CLASSES, dropout=0.5, l1=1e-4, l2=1e-3)
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    before, after = smoke(head, x, random_labels(4))
    trainable = [w.path for w in head.trainable_weights]
    assert learned(before, after, trainable) == trainable


def classifier_smoke(extractor: keras.Model, *, tta: bool = False) -> list[str]:
    """Smoke-test extractor + a new head; returns the head weights the step moved."""
    head = build_head(extractor.output_shape[-1], CLASSES)
    model = build_image_classifier(extractor, head, tta=tta)
    before, after = smoke(model, random_images(4), random_labels(4))
    head_paths = [w.path for w in head.weights]
    frozen_paths = [w.path for w in extractor.weights]  # backbone and preprocessing
    assert frozen_paths
    assert {w.path for w in model.trainable_weights} == set(head_paths)
    assert changed(before, after, frozen_paths) == []
    return learned(before, after, head_paths)


def test_image_classifier_smoke_mobilenet_with_tta() -> None:
    extractor = build_feature_extractor("MobileNetV2", "none", SIZE)
    moved = classifier_smoke(extractor, tta=True)
    # Random-weight MobileNetV2 features are ~1e-12 at 32 px: the head kernel gets next to no
    # gradient there, but the bias does learn.
    assert [p for p in moved if p.endswith("classifier/bias")] != []


@pytest.fixture(scope="module")
def vgg16_extractor() -> keras.Model:
    """A 'caffe' backbone extractor, built once. Tests must not change its weights."""
    keras.utils.set_random_seed(99)
    return build_feature_extractor("VGG16", "none", SIZE)


def test_image_classifier_smoke_caffe_backbone(vgg16_extractor: keras.Model) -> None:
    assert isinstance(vgg16_extractor.get_layer("preprocess"), keras.layers.Conv2D)
    moved = classifier_smoke(vgg16_extractor)
    assert len(moved) == 2  # the head's kernel and bias


def test_fine_tune_step_trains_only_the_unfrozen_top() -> None:
    # ResNet50: BatchNormalization throughout, 'caffe' preprocessing, and features of a
    # usable scale even with random weights.
    extractor = build_feature_extractor("ResNet50", "none", SIZE)
    head = build_head(extractor.output_shape[-1], CLASSES)
    model = build_image_classifier(extractor, head)
    compile_classifier(model, make_optimizer("adam", 1e-3), CLASSES)  # as the transfer stage
    backbone = get_backbone_model(model)
    layers = non_input_layers(backbone)
    _, frozen_trainable = parameter_counts(model)
    unfreeze_top(backbone, 10)
    assert parameter_counts(model)[1] > frozen_trainable
    top_paths = [w.path for layer in layers[-10:] if not isinstance(layer, BN)
                 for w in layer.weights]
    bottom_paths = [w.path for layer in layers[:-10] for w in layer.weights]
    bn_paths = [w.path for layer in layers if isinstance(layer, BN) for w in layer.weights]
    preprocess_paths = [w.path for w in extractor.get_layer("preprocess").weights]
    assert top_paths and bottom_paths and bn_paths and preprocess_paths

    x, y = random_images(4), random_labels(4)
    compile_classifier(model, make_optimizer("adam", 1e-3), CLASSES)  # recompile after unfreezing
    before = numpy_weights(model.weights)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = numpy_weights(model.weights)

    assert learned(before, after, top_paths) == top_paths
    head_paths = [w.path for w in head.weights]
    assert learned(before, after, head_paths) == head_paths
    assert changed(before, after, bottom_paths) == []
    first_conv = backbone.get_layer("conv1_conv").kernel.path
    assert first_conv in bottom_paths
    # BatchNormalization stays in inference mode: scale, offset and moving stats untouched.
    assert changed(before, after, bn_paths) == []
    assert changed(before, after, preprocess_paths) == []


def test_crop_and_tta_in_the_classifier_match_the_cached_feature_path(
        tmp_path: Path, standin_weights: Path) -> None:
    """The deployed model (raw images, centre crop and mirror average inside) gives what the
    features stage's NumPy crops and flips through the extractor and head give. On learned
    weights: a crop a pixel off or a missing flip changes the probabilities."""
    from foodtransfer.data.augment import center_crop, flip

    extractor = build_feature_extractor("MobileNetV2", str(standin_weights), SIZE)
    head = build_head(extractor.output_shape[-1], CLASSES)
    model = build_image_classifier(extractor, head, image_size=SIZE + 9, tta=True)
    images = np.random.default_rng(4).integers(0, 256, (3, SIZE + 9, SIZE + 9, 3), np.uint8)
    crops = center_crop(images, SIZE)
    plain = keras.ops.convert_to_numpy(head(extractor(crops.astype("float32"))))
    mirrored = keras.ops.convert_to_numpy(head(extractor(flip(crops).astype("float32"))))
    deployed = keras.ops.convert_to_numpy(model(images.astype("float32")))
    # The check can fail: the mirror image and a shifted crop give other probabilities.
    shifted = keras.ops.convert_to_numpy(head(extractor(
        images[:, 1:SIZE + 1, 1:SIZE + 1].astype("float32"))))
    assert np.abs(plain - mirrored).max() > 1e-3 and np.abs(plain - shifted).max() > 1e-3
    np.testing.assert_allclose(deployed, (plain + mirrored) / 2, atol=1e-5)
    # Saved and loaded (the flip layer is registered), it predicts the same.
    model.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras", compile=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images.astype("float32"))),
                               deployed, atol=1e-6)
