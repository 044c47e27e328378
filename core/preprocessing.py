"""The one image decoder used by training, inference and the dashboard, plus resizing helpers.

`load_image(source) -> uint8 (H, W, 3)` accepts a path, raw bytes or a binary file object and either
returns a usable RGB image or raises `InvalidImageError` with a message a clinician can act on.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import InvalidImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

#: Largest accepted pixel count (well below Pillow's 89 MP bomb limit): 40 MP, e.g. 8000 x 5000.
MAX_PIXELS = 40_000_000
#: Largest accepted file size in bytes (the dashboard's upload cap is the same, 50 MB).
MAX_BYTES = 50 * 1024 * 1024
#: Smallest accepted side in pixels; anything smaller carries no usable tissue or lesion detail.
MIN_SIDE = 16

SUPPORTED_FORMATS = "PNG, JPEG, TIFF, BMP (and GIF/WebP)"


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and what the decoder had to do to it (shown to the user)."""

    array: np.ndarray  # uint8 (H, W, 3), RGB
    source_mode: str
    source_format: str
    notes: tuple[str, ...] = field(default_factory=tuple)


def _read_bytes(source: ImageSource, max_bytes: int) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "The uploaded file"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.name
        if not path.is_file():
            raise InvalidImageError(f"Image file not found: {path}.")
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidImageError(
                f"{name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB. "
                "Export a smaller PNG or JPEG (for example a region of interest).")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        name = getattr(source, "name", "The uploaded file")
        data = source.read(max_bytes + 1)
    else:
        raise InvalidImageError(f"Cannot read an image from a {type(source).__name__}.")
    if len(data) == 0:
        raise InvalidImageError(f"{name} is empty (0 bytes). Upload the image file again.")
    if len(data) > max_bytes:
        raise InvalidImageError(
            f"{name} is larger than the {max_bytes / 2**20:.0f} MB limit. "
            "Export a smaller PNG or JPEG (for example a region of interest).")
    return data, str(name)


def _integer_to_8bit(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """Scale a 16-bit (or wider) integer image to 0..255 by the bit depth its values fit.

    Scanners often store 10-, 12- or 14-bit data in a 16-bit file: dividing by 257 would leave such an image
    nearly black (a 12-bit maximum of 4095 becomes 16 of 255). Values that fit b bits are scaled by
    255 / (2^b - 1), b the smallest of 8, 10, 12, 14, 16; wider integers by their maximum. Relative
    intensities are kept in every case."""
    top = float(arr.max(initial=0))
    if top > 65535:
        notes.append(f"32-bit integer image was scaled to 8 bits by its maximum (value x 255 / {top:.0f}).")
        return np.clip(arr, 0, None) * (255.0 / top)
    bits = next(b for b in (8, 10, 12, 14, 16) if top <= 2 ** b - 1)
    if bits == 16:
        notes.append("16-bit image was scaled to 8 bits (value / 257).")
        return arr / 257.0
    if bits == 8:
        notes.append("16-bit file holding 8-bit values (maximum {:.0f}): values used as they are.".format(top))
        return arr
    notes.append(f"16-bit file holding {bits}-bit values (maximum {top:.0f}): scaled to 8 bits "
                 f"(value x 255 / {2 ** bits - 1}).")
    return arr * (255.0 / (2 ** bits - 1))


def _to_uint8_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        if float(alpha.min()) < 1.0:
            notes.append("Transparent areas were placed on a white background.")
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            notes.append("Non-finite pixel values were set to 0.")
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            notes.append("Floating-point image was scaled to 0-255 from its own range.")
        elif mode.startswith("I;16") or float(arr.max(initial=0)) > 255:
            arr = _integer_to_8bit(arr, notes)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "CMYK":
        notes.append("CMYK image was converted to RGB.")
    if mode == "YCbCr" or mode == "LAB" or mode == "HSV":
        notes.append(f"{mode} image was converted to RGB.")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(source: ImageSource, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                 min_side: int = MIN_SIDE) -> DecodedImage:
    """Decode any supported image into uint8 RGB (H, W, 3), honouring EXIF orientation.

    Raises `InvalidImageError` (a ValueError) for anything unusable.
    """
    data, name = _read_bytes(source, max_bytes)
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        raise InvalidImageError(
            f"{name} is a vector (SVG) drawing, not a scanned image. Export it as PNG or JPEG.")
    if head.startswith(b"%pdf"):
        raise InvalidImageError(f"{name} is a PDF document. Export the page or figure as PNG or JPEG.")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"{name} declares {width} x {height} pixels ({width * height / 1e6:.0f} MP); "
                    f"the limit is {max_pixels / 1e6:.0f} MP. Export a smaller region or downscale it.")
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                im.seek(0)
                notes.append(f"The file has {n_frames} frames; only the first frame is used.")
            im.load()
            fmt = im.format or "unknown"
            im = ImageOps.exif_transpose(im) or im
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"{name} declares too many pixels to open safely (limit {max_pixels / 1e6:.0f} MP).") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"{name} is not an image format this tool can read. Use {SUPPORTED_FORMATS}.") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise InvalidImageError(
            f"{name} is damaged or incomplete (the image data ends early or is corrupt). "
            "Export or copy the file again.") from exc
    source_mode = im.mode
    if source_mode == "1":
        notes.append("1-bit (black and white) image was expanded to 8 bits.")
    if min(im.size) < min_side:
        raise InvalidImageError(
            f"{name} is only {im.size[0]} x {im.size[1]} pixels; at least {min_side} pixels per side are "
            "needed. Upload the full-resolution image.")
    try:
        arr = _to_uint8_rgb(im, notes)
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"{name} uses a pixel format ({source_mode}) that cannot be converted "
                                "to RGB. Export it as an 8-bit PNG.") from exc
    if int(arr.max()) == int(arr.min()):
        notes.append("The image is a single uniform colour; predictions on it are meaningless.")
    return DecodedImage(array=np.ascontiguousarray(arr), source_mode=source_mode, source_format=fmt,
                        notes=tuple(notes))


def load_image(source: ImageSource, **limits) -> np.ndarray:
    """Decode `source` (path, bytes or file object) to a uint8 RGB array of shape (H, W, 3)."""
    return decode_image(source, **limits).array


def load_mask(paths, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Union of one or more lesion masks as a bool array (H, W); nonzero pixels are lesion.

    With no paths returns an all-False mask of `shape`.
    """
    mask = None
    for p in paths:
        with Image.open(p) as im:
            m = np.asarray(im.convert("L")) > 0
        if shape is not None and m.shape != tuple(shape):
            m = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        mask = m if mask is None else (mask | m if m.shape == mask.shape else mask)
    if mask is None:
        if shape is None:
            raise ValueError("load_mask needs a shape when there are no mask files")
        return np.zeros(shape, dtype=bool)
    return mask


def pad_patch(image: np.ndarray, side: int, fill: int = 255) -> np.ndarray:
    """Pad a uint8 (h, w, 3) patch cut by a slide's border to (max(h, side), max(w, side), 3) with `fill`
    (white glass) on the bottom and right, where the border lies in IDC's patch grid."""
    h, w = image.shape[:2]
    if h >= side and w >= side:
        return image
    out = np.full((max(h, side), max(w, side), 3), fill, np.uint8)
    out[:h, :w] = image
    return out


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, C) or (H, W) to (height, width) = `size`: area when shrinking, linear otherwise."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    interp = cv2.INTER_AREA if size[0] * size[1] < h * w else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interp)


def apply_clahe(image: np.ndarray, clip_limit: float = 2.0, tile: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation on the luminance of a uint8 RGB image."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile, tile))
    lab[..., 0] = clahe.apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def model_input(image: np.ndarray, size: int, clahe: bool = False) -> np.ndarray:
    """The one train/inference transform: any image array -> uint8 RGB (size, size, 3), CLAHE optional."""
    img = resize(ensure_rgb_uint8(image), (size, size))
    return apply_clahe(img) if clahe else img


def ensure_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays -> uint8 RGB (H, W, 3): uint8 and float 0-255 as they
    are, bool as 0 / 255, wider integers by the bit depth their values fit (as uploads); InvalidImageError else."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidImageError(f"Expected an image array (H, W[, C]) with 1, 3 or 4 channels; got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidImageError(f"The image array is empty (shape {arr.shape}).")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 1 and int(arr.max()) > 255:  # not empty: checked above
        arr = _integer_to_8bit(arr.astype(np.float64), [])  # 16-bit data by its bit depth, as decode_image does
    if arr.dtype != np.uint8:
        arr = np.clip(np.nan_to_num(arr.astype(np.float32)), 0, 255).round().astype(np.uint8)
    return arr
