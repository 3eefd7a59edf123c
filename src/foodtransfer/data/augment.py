"""Centre crops and seeded augmented views of decoded images, for the caches of the features
and fine-tune stages.

A view of an image is a random resized crop (a share of its area and an aspect ratio, as in
Inception training), a horizontal flip half of the time and a small colour jitter (brightness,
contrast, saturation), resized to the backbone's input. Its randomness comes only from
``(seed, image index in its store, view number)``: the same ``data.seed`` gives the same views
on any machine, in any batch, in any process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_AREA = (0.35, 1.0)  # share of the image's area a random crop keeps
CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio (width / height)
JITTER = 0.1  # brightness, contrast and saturation vary by up to ±10 %
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def crop_size(image_size: int, crop: float) -> int:
    """The side the backbone sees: the centre ``crop`` share of an ``image_size`` image."""
    return max(1, int(round(image_size * crop)))


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` square of each image (the offsets of Keras'
    ``CenterCrop`` layer, which the deployed model uses)."""
    height, width = images.shape[1:3]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(images[:, top:top + size, left:left + size])


def flip(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def _crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: area share and log-uniform aspect ratio,
    up to 10 tries, else the whole image."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_width = int(round(math.sqrt(target * ratio)))
        crop_height = int(round(math.sqrt(target / ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    return 0, 0, width, height


def augmented_view(image: np.ndarray, size: int, seed: int, index: int, view: int
                   ) -> np.ndarray:
    """View ``view`` of the image at row ``index`` of its store: uint8 ``size`` x ``size``."""
    rng = np.random.default_rng([seed, index, view])
    box = _crop_box(rng, *image.shape[:2])
    pixels = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                      box=box), dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, 3)
    pixels = pixels * brightness
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    gray = pixels @ LUMA
    pixels = gray[..., None] + (pixels - gray[..., None]) * saturation
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def augmented_views(images: np.ndarray, indices: np.ndarray, size: int, seed: int,
                    view: int) -> np.ndarray:
    """View ``view`` of each image (``indices``: their rows in the store)."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for row, (image, index) in enumerate(zip(images, indices)):
        out[row] = augmented_view(image, size, seed, int(index), view)
    return out


# Transforms of a batch read from an image store (``images``, their store ``indices``), as the
# feature and fine-tune caches apply them (foodtransfer.data.datasets.Transform). Values, not
# closures: two equal transforms give the same rows, so the caches can share a backbone pass.
@dataclass(frozen=True)
class CropTransform:
    """The centre ``size`` square of each image."""

    size: int

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return center_crop(images, self.size)


@dataclass(frozen=True)
class MirrorTransform:
    """The mirror image of that centre square."""

    size: int

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return flip(center_crop(images, self.size))


@dataclass(frozen=True)
class ViewTransform:
    """Augmented view number ``view`` (from 1) of each image."""

    size: int
    seed: int
    view: int

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return augmented_views(images, indices, self.size, self.seed, self.view)


def crop_transform(size: int) -> CropTransform:
    return CropTransform(size)


def mirror_transform(size: int) -> MirrorTransform:
    return MirrorTransform(size)


def view_transform(size: int, seed: int, view: int) -> ViewTransform:
    return ViewTransform(size, seed, view)
