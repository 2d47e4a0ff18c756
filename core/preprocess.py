"""Inference input: images of any type to RGB arrays, resized as the paper evaluates, normalized and padded.

Shapes: N images; (h, w) one resized image; (H, W) the padded batch (largest h and w of the batch).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_array(image: Any) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a numpy array, a PIL image or encoded bytes.

    Args:
        image: (H, W, 3) or (H, W, 4) uint8 array (alpha dropped), (H, W) grayscale uint8, a PIL image
            in any mode, or the bytes of a file Pillow reads (JPEG, PNG, ...), turned by its EXIF orientation.

    Raises:
        ValueError: an array of another shape or dtype, or bytes that are not a readable image.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ValueError("cannot decode an empty byte string (0 bytes)")
        try:
            with Image.open(io.BytesIO(image)) as img:
                img.load()
                # Photos in the frame viewers show (their EXIF orientation applied), as batch inference reads them.
                return np.array(ImageOps.exif_transpose(img).convert("RGB"))  # a writable copy
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image bytes ({type(e).__name__}: {e})") from e
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    if isinstance(image, torch.Tensor):
        raise TypeError("give images as (H, W, 3) uint8 numpy arrays, PIL images or bytes, not torch tensors")
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"image arrays must be (H, W, 3), (H, W, 4) or (H, W), got shape {a.shape}")
    return np.ascontiguousarray(a)


def size_for_short_side(height: int, width: int, short_side: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) with the short side ``short_side``, shrunk so that the long side stays <= ``max_size``.

    The integer arithmetic of DETR's ``get_size_with_aspect_ratio``, so sizes match the authors' evaluation;
    a strip it would shrink to 0 pixels across (1x3000) becomes 1 pixel across and ``max_size`` long.
    """
    size = short_side
    if max_size is not None:
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
        if size < 1:
            return (1, max_size) if height < width else (max_size, 1)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (H, W, 3) uint8, antialiased when shrinking (as Pillow's BILINEAR, within 1)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays (np.asarray of a PIL image)
        image = image.copy()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W) view
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())  # (3, h, w) -> (h, w, 3)


def pad_and_normalize_batch(
    images: Sequence[np.ndarray | torch.Tensor],
    pixel_mean: Sequence[float] = IMAGENET_MEAN,
    pixel_std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized uint8 images -> the model's input batch, normalized on ``device``.

    Only the uint8 pixels are moved to the device (4x fewer bytes than float32); the padding is 0 after
    normalization, as DETR pads.

    Args:
        images: N (h, w, 3) uint8 arrays or tensors.

    Returns:
        images: (N, 3, H, W) float32, (x/255 - mean)/std inside each image, 0 on padding.
        mask: (N, H, W) bool, True on padding.
    """
    if not images:
        raise ValueError("cannot batch an empty list of images")
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    out = torch.zeros((len(images), 3, hmax, wmax), dtype=torch.float32, device=device)
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool, device=device)
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32, device=device).view(3, 1, 1)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        if isinstance(im, np.ndarray) and not im.flags.writeable:  # e.g. np.frombuffer over Arrow memory
            im = im.copy()
        x = torch.as_tensor(im).to(device, non_blocking=True).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
        out[i, :, :h, :w] = (x.float() / 255.0 - mean) / std
        mask[i, :h, :w] = False
    return out, mask
