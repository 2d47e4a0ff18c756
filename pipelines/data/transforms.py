"""Deformable DETR's augmentation on numpy images with boxes: flip, multi-scale resize, resize-crop-resize.

Legend: H, W image height and width; K boxes. Images are (H, W, 3) uint8 RGB. Boxes are float32 pixel
`xyxy` of the current image until `boxes_xyxy_to_cxcywh_normalized`, which the model consumes.
The functions take and return plain arrays so batch inference can use them without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.preprocess import resize_rgb, size_for_short_side


@dataclass(frozen=True)
class Affine:
    """Axis-aligned map from input to output pixel coordinates: x' = sx*x + tx, y' = sy*y + ty."""

    sx: float = 1.0
    tx: float = 0.0
    sy: float = 1.0
    ty: float = 0.0

    def then(self, other: Affine) -> Affine:
        """This map followed by `other`."""
        return Affine(
            other.sx * self.sx, other.sx * self.tx + other.tx, other.sy * self.sy, other.sy * self.ty + other.ty
        )

    def inverse(self) -> Affine:
        return Affine(1.0 / self.sx, -self.tx / self.sx, 1.0 / self.sy, -self.ty / self.sy)

    def apply(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(K, 4) xyxy -> (K, 4) xyxy; corners are re-ordered after a flip."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        xs = b[:, [0, 2]] * self.sx + self.tx
        ys = b[:, [1, 3]] * self.sy + self.ty
        out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
        return out.astype(np.float32)

    def as_array(self) -> np.ndarray:
        return np.array([self.sx, self.tx, self.sy, self.ty], dtype=np.float64)


@dataclass
class Transformed:
    """An augmented image and the boxes that survived it."""

    image: np.ndarray  # (H', W', 3) uint8
    boxes_xyxy: np.ndarray  # (K', 4) float32, pixels of `image`
    keep: np.ndarray  # (K',) int64: index of each output box among the input boxes
    affine: Affine  # input pixels -> output pixels (before clipping to a crop)


def boxes_xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def boxes_xyxy_to_cxcywh_normalized(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, 4) pixel xyxy -> (K, 4) cxcywh in [0, 1] of the (unpadded) image."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    cxcy = (b[:, :2] + b[:, 2:]) / 2
    wh = b[:, 2:] - b[:, :2]
    return (np.concatenate([cxcy, wh], axis=1) / scale).astype(np.float32)


def boxes_cxcywh_normalized_to_xyxy(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of `boxes_xyxy_to_cxcywh_normalized`."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [width, height, width, height]
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1).astype(np.float32)


def resize(
    image: np.ndarray, boxes_xyxy: np.ndarray, short_side: int, max_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, Affine]:
    h, w = image.shape[:2]
    oh, ow = size_for_short_side(h, w, short_side, max_size)
    affine = Affine(sx=ow / w, sy=oh / h)
    return resize_rgb(image, oh, ow), affine.apply(boxes_xyxy), affine


def hflip(image: np.ndarray, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray, Affine]:
    w = image.shape[1]
    affine = Affine(sx=-1.0, tx=float(w))
    return image[:, ::-1], affine.apply(boxes_xyxy), affine


def crop(
    image: np.ndarray, boxes_xyxy: np.ndarray, top: int, left: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Affine]:
    """Crop the window and clip boxes to it; boxes left with no width or height are dropped.

    Returns:
        image (height, width, 3), boxes (K', 4), keep (K',) indices of surviving input boxes, affine.
    """
    affine = Affine(tx=-float(left), ty=-float(top))
    b = affine.apply(boxes_xyxy)
    b = np.clip(b, 0.0, np.array([width, height, width, height], dtype=np.float32))
    keep = np.nonzero((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))[0]
    return image[top : top + height, left : left + width], b[keep], keep, affine


def random_size_crop(
    image: np.ndarray, boxes_xyxy: np.ndarray, rng: np.random.Generator, min_size: int, max_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Affine]:
    """DETR's RandomSizeCrop: side lengths uniform in [min_size, min(side, max_size)], position uniform."""
    h, w = image.shape[:2]
    # A side shorter than min_size (tiny images, small demo sizes) is taken whole rather than failing.
    cw = int(rng.integers(min(min_size, w), min(w, max_size) + 1))
    ch = int(rng.integers(min(min_size, h), min(h, max_size) + 1))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return crop(image, boxes_xyxy, top, left, ch, cw)


def train_transform(
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    rng: np.random.Generator,
    *,
    short_sides: Sequence[int],
    max_size: int,
    crop_resize_sides: Sequence[int],
    crop_size: tuple[int, int],
    hflip_prob: float = 0.5,
    crop_prob: float = 0.5,
) -> Transformed:
    """The paper's training augmentation.

    Horizontal flip; then either a resize of the short side to one of `short_sides` (long side at most
    `max_size`), or a resize to one of `crop_resize_sides`, a random crop of `crop_size` and the same
    multi-scale resize.

    Args:
        image: (H, W, 3) uint8.
        boxes_xyxy: (K, 4) pixel boxes of `image`.
        rng: the sample's generator; the caller seeds it per (seed, epoch, image) for reproducibility.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    keep = np.arange(len(boxes), dtype=np.int64)
    affine = Affine()
    if rng.random() < hflip_prob:
        image, boxes, a = hflip(image, boxes)
        affine = affine.then(a)
    if rng.random() < crop_prob:
        image, boxes, a = resize(image, boxes, int(rng.choice(crop_resize_sides)))  # no max_size: as DETR
        affine = affine.then(a)
        image, boxes, kept, a = random_size_crop(image, boxes, rng, crop_size[0], crop_size[1])
        keep, affine = keep[kept], affine.then(a)
    image, boxes, a = resize(image, boxes, int(rng.choice(short_sides)), max_size)
    return Transformed(np.ascontiguousarray(image), boxes, keep, affine.then(a))


def val_transform(
    image: np.ndarray, boxes_xyxy: np.ndarray | None = None, *, short_side: int = 800, max_size: int = 1333
) -> Transformed:
    """Evaluation and inference: short side `short_side`, long side at most `max_size`."""
    boxes = np.zeros((0, 4), np.float32) if boxes_xyxy is None else np.asarray(boxes_xyxy, np.float32)
    image, boxes, affine = resize(image, boxes.reshape(-1, 4), short_side, max_size)
    return Transformed(np.ascontiguousarray(image), boxes, np.arange(len(boxes), dtype=np.int64), affine)


def normalize_image(image: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, as torchvision's ToTensor then Normalize(mean, std)."""
    x = torch.as_tensor(image).permute(2, 0, 1).float().div_(255.0)  # (H, W, 3) -> (3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)
