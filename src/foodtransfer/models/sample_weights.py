"""Learnable backbone weights made offline: MobileNetV2 briefly pretrained on generated classes.

Random-weight backbones (``weights=none``) give features of about 1e-11 at small sizes, so every
head predicts chance and nothing an offline run shows is about transfer learning. ImageNet
weights need the network. :func:`pretrain` makes a stand-in the way ImageNet weights are made,
at toy scale: it trains our MobileNetV2 (32 px) to tell apart 8 generated "source" classes (the
hue and stripe angle every generated class carries, data/sample.py), recalibrates its
BatchNormalization statistics, and saves the backbone as a ``.weights.h5`` file that
``weights=<file>`` loads at any image size. The pipeline's sample classes are not the source
classes (20 classes put their hues between and on the 8 source hues), as Food-101's classes are
not ImageNet's. ``foodtransfer sample-weights`` writes it; ``make repro-sample`` uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BACKBONE = "MobileNetV2"
SOURCE_CLASSES = 8
SIZE = 32  # the backbone's input side while pretraining; the weights load at any size
IMAGES_PER_CLASS = 64
EPOCHS = 5
SEED = 1234
DEFAULT_PATH = Path("weights") / "sample-mobilenetv2.weights.h5"


def source_images(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Generated images of the source classes at random sizes (16-56 px), resized to SIZE as
    trim does, with their labels."""
    from PIL import Image

    from foodtransfer.data.sample import render_image

    images, labels = [], []
    for label in range(SOURCE_CLASSES):
        for _ in range(IMAGES_PER_CLASS):
            size = (int(rng.integers(16, 57)), int(rng.integers(16, 57)))
            image = render_image(rng, label, SOURCE_CLASSES, size)
            images.append(np.asarray(Image.fromarray(image).resize((SIZE, SIZE),
                                                                   Image.BILINEAR)))
            labels.append(label)
    return np.stack(images).astype("float32"), np.array(labels)


def pretrain(path: Path) -> float:
    """Pretrain MobileNetV2 on the source classes and save its backbone weights to ``path``
    (atomically). Returns the source classes' training accuracy at the last epoch."""
    import keras

    from foodtransfer.models.backbones import build_backbone, preprocess_layer

    keras.utils.set_random_seed(SEED)
    images, labels = source_images(np.random.default_rng(SEED))
    flipped = images[:, :, ::-1]  # mirror images too: the pipeline's views and TTA flip
    images, labels = np.concatenate([images, flipped]), np.concatenate([labels, labels])
    backbone = build_backbone(BACKBONE, "none", SIZE)
    batch_norms = [layer for layer in backbone.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in batch_norms:
        layer.momentum = 0.9  # Keras' 0.999 needs thousands of steps to settle
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(preprocess_layer(BACKBONE)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(SOURCE_CLASSES, activation="softmax")(
        pooled))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(images, labels, batch_size=64, epochs=EPOCHS, shuffle=True, verbose=0)
    # Inference-mode statistics from one large batch: the moving means and variances become
    # exactly the batch's, so the frozen backbone sees images as training did.
    for layer in batch_norms:
        layer.momentum = 0.0
    model(images[::2], training=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.weights.h5")
    try:
        backbone.save_weights(temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return float(history.history["accuracy"][-1])
