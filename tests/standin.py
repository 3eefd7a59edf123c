"""A learnable stand-in for ImageNet weights, made by the suite itself.

Random-weight backbones (``weights=none``) give features of about 1e-12 at our test sizes:
every head then predicts the same near-uniform probabilities for every image, and a test of
the transfer path passes whatever the code does. Real ImageNet weights cannot be downloaded
here, and the tests must not depend on ``../shared``. So the suite brings its own weights, the
way a user brings a local weights file: :func:`standin_weights` briefly pretrains our real
MobileNetV2 backbone (32 px) to tell apart 8 "source" classes of the generated sample (hue and
stripe angle, the signal every generated class carries), recalibrates its BatchNormalization
statistics, and saves the backbone as ``<file>.weights.h5`` for ``weights=<file>``.

The downstream classes of a test (4 or 3 generated classes) are not the source classes: their
hues lie between or on the source hues, as ImageNet classes are not Food-101's. A frozen
backbone with these weights carries the signal; with it a head learns (see the bars in
tests/test_pipeline_e2e.py) and a mismatch between two paths that should agree shows.

The file is made once per code version and machine and cached under ``.pytest_cache`` (both
pytest-xdist workers wait on one lock and share it): about 20 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path

import numpy as np

SOURCE_CLASSES = 8
SIZE = 32  # the backbone's input side while pretraining; the weights load at any size
IMAGES_PER_CLASS = 64
EPOCHS = 5
SEED = 1234
CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "foodtransfer"


def _source_images(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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


def pretrain(path: Path) -> Path:
    """Pretrain MobileNetV2 on the source classes and save its backbone weights to ``path``."""
    import keras

    from foodtransfer.models.backbones import build_backbone, preprocess_layer

    keras.utils.set_random_seed(SEED)
    images, labels = _source_images(np.random.default_rng(SEED))
    flipped = images[:, :, ::-1]  # mirror images too: the pipeline's views and TTA flip
    images, labels = np.concatenate([images, flipped]), np.concatenate([labels, labels])
    backbone = build_backbone("MobileNetV2", "none", SIZE)
    batch_norms = [layer for layer in backbone.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in batch_norms:
        layer.momentum = 0.9  # Keras' 0.999 needs thousands of steps to settle
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(preprocess_layer("MobileNetV2")(
        inputs)))
    model = keras.Model(inputs, keras.layers.Dense(SOURCE_CLASSES, activation="softmax")(
        pooled))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(images, labels, batch_size=64, epochs=EPOCHS, shuffle=True, verbose=0)
    # Inference-mode statistics from one large batch: the moving means and variances become
    # exactly the batch's, so the frozen backbone sees images as training did.
    for layer in batch_norms:
        layer.momentum = 0.0
    model(images[::2], training=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name.replace(".weights.h5", ".tmp.weights.h5"))
    backbone.save_weights(temporary)
    temporary.replace(path)
    return path


def _version() -> str:
    """What the weights depend on: this file, the sample generator, Keras' version."""
    import keras

    digest = hashlib.sha256()
    for source in (Path(__file__), Path(__file__).parents[1] / "src" / "foodtransfer" /
                   "data" / "sample.py"):
        digest.update(source.read_bytes())
    digest.update(keras.__version__.encode())
    return digest.hexdigest()[:12]


def standin_weights() -> Path:
    """The cached stand-in weights file, made first where missing (one maker at a time)."""
    path = CACHE / f"standin-mobilenetv2-{_version()}.weights.h5"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "standin.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                pretrain(path)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    return path


if __name__ == "__main__":
    print(standin_weights())
