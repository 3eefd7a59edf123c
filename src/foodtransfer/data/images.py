"""Decoding photographs once, and the on-disk store of decoded images.

The store is a plain ``.npy`` file of ``uint8`` images, shape ``(N, size, size, 3)``: written
image by image (memory does not grow with N), readable by ``numpy.load(mmap_mode="r")`` and
read back in batches by :class:`ImageStore` with plain file reads, so later stages never decode
a JPEG again and never hold the dataset in memory.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

HEADER_BYTES = 256  # fixed-size .npy header so the count can be rewritten at the end

# The most pixels an image may declare, checked on its header before anything is decoded:
# Food-101's photos are at most 512 px a side (0.26 MP) and phones take photos of up to about
# 50 MP (8160 x 6120), so 60 MP refuses nothing a camera makes, while a PNG declaring more (a
# few hundred KB can declare 300 MP, and PNG is decoded whole) would take gigabytes. The limit
# is on the declared size whatever the format: JPEG's reduced-scale decoding (draft mode) does
# not bound a progressive JPEG, whose decoder keeps the whole image's coefficients. One decode
# of 60 MP holds at most 240 MB (4 bytes a pixel: RGBA, CMYK, 16-bit grey with its conversion)
# and its RGB copy 180 MB.
MAX_PIXELS = 60_000_000
# A progressive JPEG's decoder keeps every coefficient of the image (about 6 bytes a pixel, 8
# in CMYK) whatever the scale asked for: a lower limit keeps it near the same memory. Cameras
# and phones write baseline JPEG; progressive ones are mostly web images, far smaller.
MAX_PROGRESSIVE_PIXELS = 30_000_000
# The formats photos come in (PIL opens many more, EPS among them, which hands the file to
# Ghostscript). JPEG includes MPO, the multi-picture JPEG some cameras and phones write (its
# first picture is decoded). Animations are refused: an animated WebP's decoder holds whole
# canvases beside the frame.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# PIL's own guard for other code in the process (Gradio opens uploads, for their header
# only): it refuses at Image.open what declares over twice this.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


def too_many_pixels(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` is refused before it is decoded, or None."""
    if width * height <= MAX_PIXELS:
        return None
    return _refused(f"{width} x {height} pixels", width * height)


def _refused(declared: str, pixels: int, limit: int = MAX_PIXELS,
             kind: str = "a photo") -> str:
    return (f"the image declares {declared} ({pixels / 1e6:.0f} MP), over the limit of "
            f"{limit / 1e6:.0f} MP for {kind}; it was not decoded. Resize it first "
            "(Food-101's photos are at most 512 px a side)")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit grey (PNG, TIFF) scaled to 8 bits; PIL's own conversion clips it to white."""
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((pixels >> 8).astype(np.uint8), "L")
    return image


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray | None
    reason: str | None = None  # why the file was skipped (pixels is None) or a note


def decode_image(source: str | os.PathLike[str] | bytes, size: int) -> Decoded:
    """Decode a photo (one of :data:`PHOTO_FORMATS`: JPEG, PNG under a .jpg name, CMYK,
    grayscale, large) from a file or from its encoded bytes to RGB ``size`` x ``size`` uint8,
    or say why it cannot be used. The header is read first: an image declaring more than
    :data:`MAX_PIXELS` pixels, an animation, or 32-bit integer or float pixels are refused
    without being decoded."""
    encoded = isinstance(source, (bytes, bytearray, memoryview))
    path = None if encoded else Path(source)
    try:
        if (len(source) if encoded else path.stat().st_size) == 0:
            return Decoded(None, "empty file (0 bytes)" if path else "no bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(io.BytesIO(source) if encoded else path,
                            formats=PHOTO_FORMATS) as image:
                refused = too_many_pixels(*image.size)
                if refused:
                    return Decoded(None, refused)
                if image.format == "JPEG" and (image.info.get("progressive")
                                               or image.info.get("progression")) \
                        and image.size[0] * image.size[1] > MAX_PROGRESSIVE_PIXELS:
                    return Decoded(None, _refused(
                        f"{image.size[0]} x {image.size[1]} pixels", image.size[0] * image.size[1],
                        MAX_PROGRESSIVE_PIXELS, "a progressive JPEG"))
                if getattr(image, "is_animated", False) and image.format != "MPO":
                    return Decoded(None, f"an animated {image.format} "
                                         f"({getattr(image, 'n_frames', '?')} frames) is not a "
                                         "photo; it was not decoded")
                if image.mode in ("I", "F"):
                    return Decoded(None, f"{image.format} with 32-bit {image.mode!r} pixels is "
                                         "not a photo's 8 or 16 bits; it was not decoded")
                note = None
                if path and image.format != "JPEG" and path.suffix.lower() in (".jpg", ".jpeg"):
                    note = f"{image.format} data in a {path.suffix} file (decoded anyway)"
                # JPEG draft mode decodes large photos at a reduced scale: fast, little memory.
                image.draft("RGB", (size, size))
                image.load()
                rgb = _to_8_bits(image).convert("RGB")
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return Decoded(np.asarray(resized, dtype=np.uint8), note)
    except FileNotFoundError:
        return Decoded(None, "file not found")
    except UnidentifiedImageError:
        return Decoded(None, "not an image in a photo format "
                             f"({', '.join(PHOTO_FORMATS)})")
    except Image.DecompressionBombError as error:  # PIL's guard, at twice the limit
        found = _BOMB_SIZE.search(str(error))
        pixels = int(found.group(1)) if found else 0
        return Decoded(None, _refused(f"{pixels} pixels", pixels) if found
                       else f"image too large to decode safely ({error})")
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
