"""Image bytes to an (H, W, 3) uint8 RGB array: simplejpeg (libjpeg-turbo) for JPEG when installed, Pillow otherwise."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # optional: about 2x faster than Pillow on JPEG, and refuses truncated files by itself
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where the wheel is missing
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8\xff"
# libjpeg-turbo messages that mean damaged data, not a flavour turbojpeg can't convert. Pillow must not
# get these files: it ignores libjpeg's warnings and fills the damaged part with gray or garbage.
# "Corrupt JPEG data: N extraneous bytes before marker 0xd9" is one of them: a damaged scan often ends
# early that way, so it can't be told from harmless padding before the end marker.
_CORRUPT_JPEG = (
    "Corrupt JPEG data",
    "Premature end of JPEG file",
    "Bogus",
    "Invalid JPEG file structure",
    "Unsupported marker type",
    "Huffman",
    "Invalid SOS parameters",
)


class ImageDecodeError(ValueError):
    """Bytes that are not a complete, readable image; the message names the file."""


def fast_decoder_available() -> bool:
    return simplejpeg is not None


def decode_image(
    data: bytes | memoryview, *, name: str = "<bytes>", decoder: Literal["auto", "pillow"] = "auto"
) -> np.ndarray:
    """Decode JPEG, PNG or anything Pillow reads to RGB.

    Grayscale, CMYK, palette and 16-bit images are converted to RGB; an alpha channel is dropped
    (not composited), as torchvision's `ImageReadMode.RGB` does. Truncated files are errors, never
    gray-filled images; so are JPEGs with corrupt data in the middle when simplejpeg is used
    (decoder="auto"). Pillow cannot tell those apart: it drops libjpeg's "Corrupt JPEG data"
    warnings, so decoder="pillow" decodes them with a damaged region and no error. Damage that
    still reads as valid coded data (it happens with small files) passes any decoder.

    Args:
        data: the encoded file.
        name: the file name, used in error messages.
        decoder: "auto" tries simplejpeg on JPEG first, "pillow" never does.

    Returns:
        (H, W, 3) uint8, C-contiguous.

    Raises:
        ImageDecodeError: empty, truncated or corrupt data.
    """
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    if decoder == "auto" and simplejpeg is not None and bytes(data[:3]) == _JPEG_MAGIC:
        try:
            # strict=True turns libjpeg warnings ("Premature end of JPEG file") into errors.
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as e:
            msg = str(e)
            if any(m in msg for m in _CORRUPT_JPEG):
                raise ImageDecodeError(f"{name}: corrupt JPEG ({msg})") from e
            # A JPEG flavour turbojpeg can't convert (or a header it can't parse): Pillow decides,
            # and its error, if any, is the one reported.
    return _decode_pillow(data, name)


def _decode_pillow(data: bytes | memoryview, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img))
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth grayscale: Pillow's convert("RGB") clips these, so scale to 8 bits ourselves.
        a = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        g = np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))
