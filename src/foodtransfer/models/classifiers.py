"""Model builders for the four variants.

- ``build_baseline``: a small CNN trained from scratch on the images.
- ``build_feature_extractor``: preprocessing + frozen backbone + global average pooling; run
  once by the features stage.
- ``build_head``: the classifier trained on cached features (transfer: no dropout and no
  regulariser; dropout: ``Dropout`` + L1L2).
- ``build_image_classifier``: extractor + head as one image -> probabilities model (what MLflow
  logs and fine-tuning trains), with ``unfreeze_top`` choosing the trainable top of the backbone.
"""

from __future__ import annotations

from typing import Literal

import keras

from foodtransfer.models.backbones import build_backbone, preprocess_layer

BACKBONE_LAYER = "backbone"
# The softmax stays float32 under the mixed_float16 policy (mixed_precision: true), so the
# probabilities and the cross-entropy loss do not lose float16's precision or overflow.
OUTPUT_DTYPE = "float32"


def image_input(image_size: int) -> keras.KerasTensor:
    """Raw RGB pixels in 0..255 (float32); every model built here takes these."""
    return keras.Input((image_size, image_size, 3), dtype="float32", name="image")


def augmentation(seed: int) -> keras.Sequential:
    """Random flip, rotation, zoom and translation: active in training only (Keras layers are
    identities at inference)."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, seed=seed + 1),
        keras.layers.RandomZoom(0.1, seed=seed + 2),
        keras.layers.RandomTranslation(0.1, 0.1, seed=seed + 3),
    ], name="augmentation")


def build_baseline(num_classes: int, image_size: int, *, input_size: int, augment: bool,
                   seed: int) -> keras.Model:
    """[[Conv2D-ReLU] x2 -> MaxPool -> Dropout] x2 -> global pooling -> Dense -> Dropout ->
    softmax, on images resized to ``image_size``."""
    inputs = image_input(input_size)
    x = inputs
    if image_size != input_size:
        x = keras.layers.Resizing(image_size, image_size, name="resize")(x)
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    if augment:
        x = augmentation(seed)(x)
    for filters in (32, 64):
        for _ in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Dropout(0.25)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier",
                                 dtype=OUTPUT_DTYPE)(x)
    return keras.Model(inputs, outputs, name="baseline")


def build_feature_extractor(backbone: str, weights: str, image_size: int) -> keras.Model:
    """image (0..255) -> preprocessing -> frozen backbone (inference mode) -> pooled features."""
    base = build_backbone(backbone, weights, image_size)
    base.name = BACKBONE_LAYER
    base.trainable = False
    inputs = image_input(image_size)
    x = inputs
    preprocess = preprocess_layer(backbone)
    if preprocess is not None:
        x = preprocess(x)
    # training=False keeps BatchNormalization in inference mode, also when fine-tuning.
    x = base(x, training=False)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_features")


def build_head(feature_dim: int, num_classes: int, *, dropout: float = 0.0, l1: float = 0.0,
               l2: float = 0.0) -> keras.Model:
    """features -> [Dropout] -> Dense softmax, with an optional L1L2 kernel regulariser."""
    inputs = keras.Input((feature_dim,), name="features")
    x = keras.layers.Dropout(dropout, name="dropout")(inputs) if dropout > 0 else inputs
    regularizer = keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 or l2) else None
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier",
                                 kernel_regularizer=regularizer, dtype=OUTPUT_DTYPE)(x)
    return keras.Model(inputs, outputs, name="head")


@keras.saving.register_keras_serializable(package="foodtransfer")
class HorizontalFlip(keras.layers.Layer):
    """Mirror images left to right (NHWC), always: for test-time augmentation."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=2)


def build_image_classifier(extractor: keras.Model, head: keras.Model, *,
                           image_size: int | None = None, tta: bool = False) -> keras.Model:
    """One model from raw images to class probabilities, sharing the extractor's and the
    head's layers (and so their weights): images of ``image_size`` (default: the extractor's
    input), centre-cropped to the extractor's input when larger; with ``tta``, the average of
    the probabilities of each crop and of its mirror image."""
    size = extractor.input_shape[1]
    inputs = image_input(image_size or size)
    # Float32 like the pixels: under mixed precision these would otherwise round them.
    crop = (keras.layers.CenterCrop(size, size, name="center_crop", dtype="float32")
            if (image_size or size) != size else None)

    cropped = crop(inputs) if crop is not None else inputs
    outputs = head(extractor(cropped))
    if tta:
        # The mirror of the crop, as the features stage caches it (with an odd margin the crop
        # of the mirror would be a pixel off).
        flipped = HorizontalFlip(name="flip", dtype="float32")(cropped)
        outputs = keras.layers.Average(name="tta", dtype=OUTPUT_DTYPE)(
            [outputs, head(extractor(flipped))])
    return keras.Model(inputs, outputs, name="image_classifier")


def get_backbone_model(model: keras.Model) -> keras.Model:
    """The backbone sub-model inside an extractor or an image classifier."""
    for layer in model.layers:
        if layer.name == BACKBONE_LAYER:
            return layer
        if isinstance(layer, keras.Model):
            try:
                return get_backbone_model(layer)
            except ValueError:
                continue
    raise ValueError(f"no '{BACKBONE_LAYER}' layer in model {model.name}")


def unfreeze_top(backbone: keras.Model, unfreeze: int | Literal["all"]) -> int:
    """Make the top ``unfreeze`` layers of ``backbone`` (or all) trainable, keeping every
    BatchNormalization layer frozen. Returns the number of layers made trainable.

    The caller must recompile the model afterwards for the change to take effect.
    """
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    count = len(layers) if unfreeze == "all" else min(int(unfreeze), len(layers))
    backbone.trainable = True
    trainable = 0
    for position, layer in enumerate(layers):
        on_top = position >= len(layers) - count
        layer.trainable = on_top and not isinstance(layer, keras.layers.BatchNormalization)
        trainable += int(layer.trainable)
    return trainable


def parameter_counts(model: keras.Model) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    total = sum(int(keras.ops.size(w)) for w in model.weights)
    return total, trainable


def split_frozen_bottom(backbone: keras.Model) -> tuple[keras.Model, keras.Model] | None:
    """Cut ``backbone`` below its lowest trainable layer into (frozen bottom, top) models that
    share its layers, or None when no cut exists (everything trainable, or a skip connection
    crosses every candidate cut). ``top(bottom(x))`` equals ``backbone(x)``.

    With the bottom frozen and no augmentation before it, its output for each image never
    changes during fine-tuning, so it can be computed once and cached like the features.
    """
    layers = [layer for layer in backbone.layers
              if not isinstance(layer, keras.layers.InputLayer)]
    trainable = [i for i, layer in enumerate(layers) if layer.trainable_weights]
    if not trainable or trainable[0] == 0:
        return None
    for cut in range(trainable[0] - 1, -1, -1):
        try:
            top = keras.Model(layers[cut].output, backbone.output, name="backbone_top")
        except ValueError:  # "not connected": a residual branch crosses this cut
            continue
        if not any(layer.weights for layer in layers[:cut + 1]):
            return None  # nothing but reshaping below the cut: caching saves nothing
        bottom = keras.Model(backbone.input, layers[cut].output, name="backbone_bottom")
        return bottom, top
    return None


def feature_extractor_of(model: keras.Model) -> keras.Model:
    """The extractor inside an image classifier (or the extractor itself)."""
    if model.name.endswith("_features"):
        return model
    return next(layer for layer in model.layers if layer.name.endswith("_features"))


def frozen_bottom_cut(extractor: keras.Model, bottom: keras.Model, top: keras.Model
                      ) -> tuple[keras.Model, keras.Model]:
    """The extractor cut where :func:`split_frozen_bottom` cut its backbone, as (image ->
    preprocessing -> frozen bottom, cut -> top -> pooled features), sharing its layers: the
    features are ``pooled(bottom(image))``, the fine-tune's cache holds ``bottom(image)``."""
    names = [layer.name for layer in extractor.layers]
    image = image_input(extractor.input_shape[1])
    x = extractor.get_layer("preprocess")(image) if "preprocess" in names else image
    bottom_model = keras.Model(image, bottom(x, training=False), name="frozen_bottom")
    cut = keras.Input(bottom.output_shape[1:], name="frozen_bottom_output")
    pooled = extractor.get_layer("pool")(top(cut, training=False))
    return bottom_model, keras.Model(cut, pooled, name="backbone_top")
