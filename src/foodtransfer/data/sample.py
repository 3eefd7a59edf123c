"""A generated stand-in for the Food-101 archive, for offline runs and CI.

Same layout as the official archive (``food-101/images/<class>/<id>.jpg`` and
``food-101/meta/{classes,labels,train,test}.{txt,json}``), built deterministically from the
seed (same seed, same bytes). Each class has a learnable visual signal: its own base colour and
stripe orientation, under per-image noise, jitter and a random blob, so a small CNN beats chance
clearly but not trivially. Images vary in size and mode (RGB, grayscale and CMYK JPEGs), and a
few bad files (zero bytes, a truncated JPEG, a PNG named .jpg) exercise the validation in trim.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from foodtransfer.data import food101
from foodtransfer.atomic import atomic_file
from foodtransfer.config import SampleConfig
from foodtransfer.progress import progress

MTIME = 1_262_304_000  # fixed timestamps keep the archive byte-identical across runs

# Bad files planted in the train list: (class index, position in the class's train ids, kind).
BAD_FILES = ((0, 0, "empty"), (0, 1, "truncated"), (1, 2, "png"))


def _class_seed(seed: int, class_name: str) -> list[int]:
    return [seed, zlib.crc32(class_name.encode())]


def render_image(rng: np.random.Generator, class_index: int, n_classes: int,
                 size: tuple[int, int]) -> np.ndarray:
    """One RGB uint8 image of class ``class_index``: hue and stripe angle carry the class."""
    width, height = size
    hue = (class_index / n_classes + rng.normal(0, 0.015)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 0.9), rng.uniform(0.5, 0.95)))
    angle = np.pi * ((class_index * 0.618) % 1.0) + rng.normal(0, 0.08)
    frequency = rng.uniform(6, 12) / max(width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (xs * np.cos(angle) + ys * np.sin(angle))
                                 + phase)
    image = base[None, None, :] * (0.55 + 0.45 * stripes[..., None])
    # A blob of a random colour at a random place: clutter the class does not explain.
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    radius = rng.uniform(0.1, 0.3) * min(width, height)
    blob = ((ys - cy) ** 2 + (xs - cx) ** 2) < radius**2
    image[blob] = rng.uniform(0, 1, size=3)
    image += rng.normal(0, 0.06, size=image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _encode(image: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(image, "RGB")
    if mode == "L":
        pil = pil.convert("L")
    elif mode == "CMYK":
        pil = pil.convert("CMYK")
    pil.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def build_sample_archive(destination: Path, classes: list[str], config: SampleConfig,
                         seed: int, *, show_progress: bool = True) -> dict[str, int]:
    """Write the sample archive to ``destination`` (atomically). Returns files per class."""
    per_class = config.train_per_class + config.test_per_class
    train_ids: dict[str, list[str]] = {}
    test_ids: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    bad = {(classes[c % len(classes)], position): kind for c, position, kind in BAD_FILES}
    with atomic_file(destination, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar, \
            progress(total=per_class * len(classes), desc="sample images", unit="images",
                     enabled=show_progress) as bar:
        for class_index, class_name in enumerate(classes):
            rng = np.random.default_rng(_class_seed(seed, class_name))
            ids = rng.choice(9_000_000, size=per_class, replace=False) + 100_000
            names = [f"{class_name}/{image_id}" for image_id in ids.tolist()]
            train_ids[class_name] = sorted(names[: config.train_per_class])
            test_ids[class_name] = sorted(names[config.train_per_class:])
            position_of = {name: i for i, name in enumerate(train_ids[class_name])}
            for name in names:
                size = (int(rng.integers(config.min_side, config.max_side + 1)),
                        int(rng.integers(config.min_side, config.max_side + 1)))
                image = render_image(rng, class_index, len(classes), size)
                roll = rng.random()
                mode = "L" if roll < 0.04 else "CMYK" if roll < 0.08 else "RGB"
                payload = _encode(image, mode)
                kind = bad.get((class_name, position_of.get(name, -1)))
                if kind == "empty":
                    payload = b""
                elif kind == "truncated":
                    payload = payload[: len(payload) // 3]
                elif kind == "png":
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    payload = buffer.getvalue()
                _add(tar, f"{food101.IMAGES_DIR}/{name}.jpg", payload)
                bar.update(1)
            counts[class_name] = per_class
        meta = {
            "classes.txt": "\n".join(classes) + "\n",
            "labels.txt": "\n".join(food101.label_of(c) for c in classes) + "\n",
            "train.txt": "".join(f"{n}\n" for c in classes for n in train_ids[c]),
            "test.txt": "".join(f"{n}\n" for c in classes for n in test_ids[c]),
            "train.json": json.dumps(train_ids),
            "test.json": json.dumps(test_ids),
        }
        for name, text in meta.items():
            _add(tar, f"{food101.META_DIR}/{name}", text.encode())
    return counts
