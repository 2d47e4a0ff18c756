"""Turns model outputs into detections in original-image pixels: top-k over queries x classes.

Shapes: N images, Lq queries per image, C classes (sigmoid, no background class), k detections kept.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Keeps the num_select highest (query, class) sigmoid scores per image, as the authors do for COCO.

    A query may appear several times with different classes; that is intended, it raises recall at
    the low-score end that COCO mAP rewards.

    Args:
        num_select: detections kept per image by forward.
        label_map: optional contiguous class index -> dataset category id (e.g. raw COCO ids), applied
            to the output labels; None keeps the contiguous indices.
    """

    def __init__(self, num_select: int = 100, label_map: Sequence[int] | None = None) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = num_select
        # A buffer so it follows the module to the model's device; not saved, it is dataset metadata.
        label_map_tensor = None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.int64)
        self.register_buffer("label_map", label_map_tensor, persistent=False)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Top num_select detections per image.

        Args:
            outputs: "pred_logits" (N, Lq, C) class logits; "pred_boxes" (N, Lq, 4) normalized cxcywh.
            target_sizes: (N, 2) (height, width) of each ORIGINAL image, before resizing and padding.

        Returns:
            N dicts: "scores" (k,) sigmoid probabilities, descending; "labels" (k,) int64 class indices
            (category ids with label_map); "boxes" (k, 4) xyxy in original-image pixels, not clamped
            to the image. k = min(num_select, Lq * C).
        """
        return self._top_k(outputs, target_sizes, self.num_select)

    @torch.no_grad()
    def threshold(
        self,
        outputs: dict[str, Tensor],
        target_sizes: Tensor,
        score_threshold: float = 0.5,
        max_detections: int = 100,
    ) -> list[dict[str, Tensor]]:
        """Detections for inference: at most max_detections per image, scoring above score_threshold.

        Args:
            outputs: as in forward.
            target_sizes: (N, 2) (height, width) of each original image.
            score_threshold: keep detections whose score is strictly greater.
            max_detections: keep at most this many per image (the highest scoring).

        Returns:
            N dicts with "scores" (k_i,), "labels" (k_i,) int64, "boxes" (k_i, 4) xyxy pixels, k_i varying.
        """
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        results = self._top_k(outputs, target_sizes, max_detections)
        # The top-k scores are sorted, so the kept ones are a prefix; filtering keeps that order.
        return [{key: value[r["scores"] > score_threshold] for key, value in r.items()} for r in results]

    def _top_k(self, outputs: dict[str, Tensor], target_sizes: Tensor, k: int) -> list[dict[str, Tensor]]:
        scores, labels, boxes = self.select(outputs["pred_logits"], outputs["pred_boxes"], target_sizes, k)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]

    def select(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The k best (query, class) pairs of every image, batched (what an exported graph returns).

        Args:
            logits: (N, Lq, C) class logits.
            boxes: (N, Lq, 4) normalized cxcywh.
            target_sizes: (N, 2) (height, width) of each original image.
            k: detections per image; at most Lq * C are returned.

        Returns:
            scores (N, k) descending, labels (N, k) int64, boxes (N, k, 4) xyxy in original pixels.
        """
        n, q, c = logits.shape
        if target_sizes.shape != (n, 2):
            raise ValueError(
                f"target_sizes must be (N, 2) = ({n}, 2) as (height, width), got {tuple(target_sizes.shape)}"
            )
        if self.label_map is not None and len(self.label_map) != c:
            raise ValueError(f"label_map must have one entry per class ({c}), got {len(self.label_map)}")
        k = min(k, q * c)
        prob = logits.float().sigmoid().view(n, q * c)  # (N, Lq, C) -> (N, Lq*C), index = query * C + class
        scores, flat_idx = prob.topk(k, dim=1)  # (N, k)
        query_idx = flat_idx // c  # (N, k)
        labels = flat_idx % c  # (N, k)
        if self.label_map is not None:
            labels = self.label_map[labels]
        boxes_xyxy = box_cxcywh_to_xyxy(boxes.float())  # (N, Lq, 4) normalized
        boxes_xyxy = torch.gather(boxes_xyxy, 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))  # (N, k, 4)
        img_h, img_w = target_sizes.to(boxes_xyxy).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (N, 4)
        return scores, labels, boxes_xyxy * scale[:, None, :]  # normalized -> pixels
