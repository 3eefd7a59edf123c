"""Decoding photographs once, and the on-disk store of decoded images.

The store is a plain ``.npy`` file of ``uint8`` images, shape ``(N, size, size, 3)``: written
image by image (memory does not grow with N), readable by ``numpy.load(mmap_mode="r")`` and
read back in batches by :class:`ImageStore` with plain file reads, so later stages never decode
a JPEG again and never hold the dataset in memory.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

HEADER_BYTES = 256  # fixed-size .npy header so the count can be rewritten at the end

# The most pixels a decode may hold, checked on the header before anything is decoded:
# Food-101's photos are at most 512 px a side (0.26 MP) and phones take photos of up to about
# 50 MP (8160 x 6120), so 60 MP refuses nothing a camera makes, while a PNG declaring more (a
# few hundred KB can declare 300 MP, and PNG is decoded whole) would take gigabytes. At 60 MP
# one decode holds at most about 240 MB (RGBA). A JPEG is decoded at a reduced scale (draft
# mode, down to 1/8 a side), so the limit applies to that scale: a 100 MP JPEG decodes as
# 1.6 MP.
MAX_PIXELS = 60_000_000
# The formats photos come in (PIL opens many more, EPS among them, which hands the file to
# Ghostscript). JPEG includes MPO, the multi-picture JPEG some cameras and phones write.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# PIL's own guard stays as a backstop for other code in the process (it refuses over twice
# this at Image.open); ours, below it, runs first and names the size.
Image.MAX_IMAGE_PIXELS = 1_000_000_000


def too_many_pixels(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` is refused before it is decoded, or None."""
    if width * height <= MAX_PIXELS:
        return None
    return (f"the image declares {width} x {height} pixels ({width * height / 1e6:.0f} MP), "
            f"over the limit of {MAX_PIXELS / 1e6:.0f} MP for a photo; it was not decoded. "
            "Resize it first (Food-101's photos are at most 512 px a side)")


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray | None
    reason: str | None = None  # why the file was skipped (pixels is None) or a note


def decode_image(source: str | os.PathLike[str] | bytes, size: int) -> Decoded:
    """Decode a photo (one of :data:`PHOTO_FORMATS`: JPEG, PNG under a .jpg name, CMYK,
    grayscale, large) from a file or from its encoded bytes to RGB ``size`` x ``size`` uint8,
    or say why it cannot be used. The header is read first: an image whose decode would hold
    more than :data:`MAX_PIXELS` pixels (its declared size; a JPEG's at its reduced decode
    scale) is refused without being decoded."""
    encoded = isinstance(source, (bytes, bytearray, memoryview))
    path = None if encoded else Path(source)
    try:
        if (len(source) if encoded else path.stat().st_size) == 0:
            return Decoded(None, "empty file (0 bytes)" if path else "no bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(io.BytesIO(source) if encoded else path,
                            formats=PHOTO_FORMATS) as image:
                declared = image.size
                # JPEG draft mode decodes huge photos at a reduced scale (down to 1/8 a side):
                # fast, little memory. The limit is on the pixels the decode will hold.
                image.draft("RGB", (size, size))
                if too_many_pixels(*image.size):
                    return Decoded(None, too_many_pixels(*declared))
                note = None
                if path and image.format != "JPEG" and path.suffix.lower() in (".jpg", ".jpeg"):
                    note = f"{image.format} data in a {path.suffix} file (decoded anyway)"
                image.load()
                rgb = image.convert("RGB")
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return Decoded(np.asarray(resized, dtype=np.uint8), note)
    except FileNotFoundError:
        return Decoded(None, "file not found")
    except UnidentifiedImageError:
        return Decoded(None, "not an image in a photo format "
                             f"({', '.join(PHOTO_FORMATS)})")
    except Image.DecompressionBombError as error:
        return Decoded(None, f"image too large to decode safely ({error})")
    except (OSError, SyntaxError, ValueError) as error:
        return Decoded(None, f"corrupt or truncated image ({error})")


def _npy_header(shape: tuple[int, ...], dtype: np.dtype = np.dtype(np.uint8)) -> bytes:
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(dtype), shape)
    body_length = HEADER_BYTES - 10
    body = text.ljust(body_length - 1) + "\n"
    if len(body) != body_length:
        raise ValueError(f"shape {shape} does not fit the fixed .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_length) + body.encode("latin1")


class NpyWriter:
    """Append rows of a fixed shape and dtype to a .npy file; :meth:`close` fixes the count.

    Memory stays flat whatever the number of rows: nothing is kept after it is written."""

    def __init__(self, path: Path, item_shape: tuple[int, ...], dtype: str = "uint8") -> None:
        self.path = path
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._handle = open(path, "wb")
        self._handle.write(_npy_header((0, *self.item_shape), self.dtype))

    def append(self, item: np.ndarray) -> int:
        """Write one row; returns its index."""
        if item.shape != self.item_shape or item.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} {self.item_shape}, got "
                             f"{item.dtype} {item.shape}")
        self._handle.write(np.ascontiguousarray(item).tobytes())
        self.count += 1
        return self.count - 1

    def extend(self, items: np.ndarray) -> None:
        """Write a batch of rows."""
        if items.shape[1:] != self.item_shape or items.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} (n, {self.item_shape}), got "
                             f"{items.dtype} {items.shape}")
        self._handle.write(np.ascontiguousarray(items).tobytes())
        self.count += len(items)

    def close(self) -> None:
        self._handle.seek(0)
        self._handle.write(_npy_header((self.count, *self.item_shape), self.dtype))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._handle.close()


class ImageStoreWriter(NpyWriter):
    """Append ``size`` x ``size`` RGB uint8 images to a .npy store."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(path, (size, size, 3), "uint8")


class NpyRows:
    """Read rows of a .npy file (as :class:`NpyWriter` writes them) by index, with plain file
    reads: nothing but the rows asked for is held in memory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = reader(handle)
            self.offset = handle.tell()
        if fortran or not shape:
            raise ValueError(f"{self.path} is not a C-ordered array of rows")
        self.shape = shape
        self.dtype = dtype
        self.row_bytes = int(np.prod(shape[1:])) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices: Sequence[int], rows: int | None = None) -> np.ndarray:
        """Rows at ``indices`` as a new array; with ``rows``, an array of that many rows whose
        rows after the ones read are zeros."""
        if rows is None:
            out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        elif rows < len(indices):
            raise ValueError(f"{len(indices)} rows do not fit in {rows}")
        else:
            out = np.zeros((rows, *self.shape[1:]), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as handle:
            for row, index in enumerate(indices):
                if not 0 <= index < len(self):
                    raise IndexError(f"row {index} out of range for {self.path} ({len(self)})")
                handle.seek(self.offset + int(index) * self.row_bytes)
                view = memoryview(out[row]).cast("B")
                if handle.readinto(view) != self.row_bytes:
                    raise OSError(f"{self.path} is truncated at row {index}")
        return out


class ImageStore(NpyRows):
    """Read images from a store written by :class:`ImageStoreWriter` (or any uint8 .npy of
    RGB images)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
            raise ValueError(f"{self.path} is not a uint8 (N, H, W, 3) image store")
