"""Decoding photographs once, and the on-disk store of decoded images.

The store is a plain ``.npy`` file of ``uint8`` images, shape ``(N, size, size, 3)``: written
image by image (memory does not grow with N), readable by ``numpy.load(mmap_mode="r")`` and
read back in batches by :class:`ImageStore` with plain file reads, so later stages never decode
a JPEG again and never hold the dataset in memory.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

HEADER_BYTES = 256  # fixed-size .npy header so the count can be rewritten at the end

# Food-101 photos are at most 512 px; a guard against decompression bombs far above that.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray | None
    reason: str | None = None  # why the file was skipped (pixels is None) or a note


def decode_image(path: str | os.PathLike[str], size: int) -> Decoded:
    """Decode any image PIL reads (JPEG, PNG under a .jpg name, CMYK, grayscale, huge) to RGB
    ``size`` x ``size`` uint8, or say why it cannot be used."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return Decoded(None, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                note = None
                if image.format != "JPEG" and path.suffix.lower() in (".jpg", ".jpeg"):
                    note = f"{image.format} data in a {path.suffix} file (decoded anyway)"
                # JPEG draft mode decodes huge photos at a reduced scale: fast, little memory.
                image.draft("RGB", (size, size))
                image.load()
                rgb = image.convert("RGB")
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return Decoded(np.asarray(resized, dtype=np.uint8), note)
    except FileNotFoundError:
        return Decoded(None, "file not found")
    except UnidentifiedImageError:
        return Decoded(None, "not an image (unidentified format)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return Decoded(None, f"image too large to decode safely ({error})")
    except (OSError, SyntaxError, ValueError) as error:
        return Decoded(None, f"corrupt or truncated image ({error})")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (shape,)
    body_length = HEADER_BYTES - 10
    body = text.ljust(body_length - 1) + "\n"
    if len(body) != body_length:
        raise ValueError(f"shape {shape} does not fit the fixed .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_length) + body.encode("latin1")


class ImageStoreWriter:
    """Append images to a .npy file one at a time; :meth:`close` fixes the count."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.count = 0
        self._handle = open(path, "wb")
        self._handle.write(_npy_header((0, size, size, 3)))

    def append(self, pixels: np.ndarray) -> int:
        if pixels.shape != (self.size, self.size, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 {(self.size, self.size, 3)}, got "
                             f"{pixels.dtype} {pixels.shape}")
        self._handle.write(np.ascontiguousarray(pixels).tobytes())
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        self._handle.seek(0)
        self._handle.write(_npy_header((self.count, self.size, self.size, 3)))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def __enter__(self) -> ImageStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._handle.close()


class ImageStore:
    """Read images from a store written by :class:`ImageStoreWriter` (or any uint8 .npy)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = reader(handle)
            self.offset = handle.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{self.path} is not a uint8 (N, H, W, 3) image store")
        self.shape = shape
        self.image_bytes = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Images at ``indices`` as a new (len(indices), H, W, 3) array."""
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            for row, index in enumerate(indices):
                if not 0 <= index < len(self):
                    raise IndexError(f"image {index} out of range for {self.path} ({len(self)})")
                handle.seek(self.offset + int(index) * self.image_bytes)
                view = memoryview(out[row]).cast("B")
                if handle.readinto(view) != self.image_bytes:
                    raise OSError(f"{self.path} is truncated at image {index}")
        return out

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), batch_size):
            yield self.read(indices[start:start + batch_size])
