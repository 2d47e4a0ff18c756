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
EXIF_ORIENTATION = 0x0112
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


def exif_orientation(data: bytes | memoryview) -> int:
    """The EXIF orientation tag of an encoded image (1 = upright, 2-8 = flipped or rotated); 1 when absent.

    Decoding never applies it: pixels come as stored, which is what COCO's width, height and boxes
    describe. A tag other than 1 means viewers show the image transformed (see apply_exif_orientation).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # no or damaged EXIF: decoding reports real damage
        return 1


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned into the frame a viewer shows for an EXIF orientation tag.

    The same image as Pillow's ``ImageOps.exif_transpose``: 2 mirrors, 3 turns half round, 4 flips, 5
    transposes, 6 turns a quarter clockwise, 7 transverses, 8 turns a quarter anticlockwise; 1 and
    unknown tags keep the pixels. Orientations 5-8 swap height and width.

    Args:
        pixels: (H, W, ...) array as decoded.
        orientation: the tag (exif_orientation).

    Returns:
        A C-contiguous array (``pixels`` itself for tag 1).
    """
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }.get(orientation)
    return pixels if turned is None else np.ascontiguousarray(turned(pixels))


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
