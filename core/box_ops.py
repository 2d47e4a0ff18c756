"""Box format conversions, IoU and generalized IoU (Rezatofighi et al., 2019) for the matcher and losses.

Formats: cxcywh = (center x, center y, width, height); xyxy = (x0, y0, x1, y1) corners;
xywh = COCO's (x0, y0, width, height). Coordinates may be normalized to [0, 1] or in pixels.

Shapes: A, B boxes in the two sets; K aligned pairs; ... any leading dims.
"""

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert center-size boxes to corners.

    Args:
        boxes: (..., 4) cxcywh.

    Returns:
        (..., 4) xyxy.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert corner boxes to center-size.

    Args:
        boxes: (..., 4) xyxy.

    Returns:
        (..., 4) cxcywh.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert COCO annotation boxes (top-left corner and size) to corners.

    Args:
        boxes: (..., 4) xywh.

    Returns:
        (..., 4) xyxy.
    """
    x0, y0, w, h = boxes.unbind(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of corner boxes.

    Args:
        boxes: (..., 4) xyxy.

    Returns:
        (...,) area; negative for degenerate boxes, which callers are expected to reject.
    """
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU between two sets of corner boxes.

    Args:
        boxes1: (A, 4) xyxy.
        boxes2: (B, 4) xyxy.

    Returns:
        iou: (A, B).
        union: (A, B) union areas, reused by generalized_box_iou.
    """
    area1 = box_area(boxes1)  # (A,)
    area2 = box_area(boxes2)  # (B,)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (A, B, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (A, B, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (A, B, 2), 0 where boxes do not overlap
    inter = wh[..., 0] * wh[..., 1]  # (A, B)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def _check_not_degenerate(boxes: Tensor, name: str) -> None:
    # A box with x1 < x0 gives a negative area and a meaningless GIoU that still backpropagates,
    # so fail loudly. The comparison is also False for NaN, which is how diverged training shows up.
    ok = (boxes[..., 2:] >= boxes[..., :2]).all(-1)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(
            f"degenerate box in {name}: expected xyxy with x1 >= x0 and y1 >= y0 (and no NaN), "
            f"got {boxes[tuple(bad)].tolist()} at index {bad}"
        )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU: IoU minus the fraction of the enclosing box not covered by the union.

    Ranges over [-1, 1]; unlike IoU it still orders disjoint boxes by how far apart they are.

    Args:
        boxes1: (A, 4) xyxy.
        boxes2: (B, 4) xyxy.

    Returns:
        (A, B) GIoU.

    Raises:
        ValueError: a box has x1 < x0 or y1 < y0 (or NaN coordinates).
    """
    _check_not_degenerate(boxes1, "boxes1")
    _check_not_degenerate(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])  # (A, B, 2)
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (A, B, 2)
    wh = bottom_right - top_left  # (A, B, 2), never negative for valid boxes
    enclosing = wh[..., 0] * wh[..., 1]  # (A, B)
    return iou - (enclosing - union) / enclosing


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU between aligned pairs, boxes1[k] with boxes2[k].

    Equals the diagonal of generalized_box_iou without building the (K, K) matrix; this is what the
    box loss needs once the matcher has paired predictions with targets.

    Args:
        boxes1: (K, 4) xyxy.
        boxes2: (K, 4) xyxy.

    Returns:
        (K,) GIoU.

    Raises:
        ValueError: a box has x1 < x0 or y1 < y0 (or NaN coordinates), or the counts differ.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"paired boxes must have the same shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    _check_not_degenerate(boxes1, "boxes1")
    _check_not_degenerate(boxes2, "boxes2")
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]  # (K,)
    union = area1 + area2 - inter
    enclosing_wh = torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    enclosing = enclosing_wh[:, 0] * enclosing_wh[:, 1]  # (K,)
    return inter / union - (enclosing - union) / enclosing
