"""A detector that answers with the batches' own targets, the COCO ground truth of those targets, and the AP
that pycocotools must give when every predicted box is shifted by a known fraction of its width.

With these, an evaluation path (model outputs -> original pixels -> records -> pycocotools) is checked
against numbers known in advance: AP 1.0 for the targets themselves, the IoU-derived AP for a shift.
Tests import it as ``from oracle import ...`` (pyproject puts ``tests/`` on the path).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


class Oracle(nn.Module):
    """Returns, call after call, DETR outputs made from ``batches``' targets, in order.

    Query i of image n is its target i with a confident logit on the target's label; the other queries
    are low-scored. ``shift`` moves every predicted box right by that fraction of its own width.
    """

    def __init__(self, batches: list[dict], num_classes: int, num_queries: int = 5, shift: float = 0.0) -> None:
        super().__init__()
        self.outputs = [targets_as_outputs(b["targets"], num_classes, num_queries, shift) for b in batches]
        self.calls = 0

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.outputs[self.calls]
        assert out["pred_logits"].shape[0] == images.shape[0], "the oracle was built for other batches"
        self.calls += 1
        return out


def targets_as_outputs(targets: list[dict], num_classes: int, num_queries: int, shift: float) -> dict:
    n = len(targets)
    logits = torch.full((n, num_queries, num_classes), -10.0)  # (N, Lq, C)
    boxes = torch.full((n, num_queries, 4), 0.05)  # (N, Lq, 4) cxcywh, normalized
    for i, t in enumerate(targets):
        k = len(t["labels"])
        assert k <= num_queries
        b = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4).clone()
        b[:, 0] += shift * b[:, 2]
        boxes[i, :k] = b
        logits[i, torch.arange(k), torch.as_tensor(t["labels"])] = 10.0
    return {"pred_logits": logits, "pred_boxes": boxes}


def coco_ground_truth(batches: list[dict], label_map: list[int]) -> dict:
    """The COCO dict of the batches' targets, boxes in each image's ORIGINAL pixels (``orig_size``)."""
    images, annotations = [], []
    for batch in batches:
        for t in batch["targets"]:
            h, w = (float(s) for s in t["orig_size"])
            images.append({"id": int(t["image_id"]), "height": h, "width": w})
            for box, label in zip(torch.as_tensor(t["boxes"]).reshape(-1, 4).tolist(), t["labels"].tolist()):
                cx, cy, bw, bh = box
                xywh = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": int(t["image_id"]),
                        "category_id": label_map[label],
                        "bbox": xywh,
                        "area": xywh[2] * xywh[3],
                        "iscrowd": 0,
                    }
                )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in label_map],
    }


def ap_of_shift(shift: float) -> float:
    """COCO AP when every detection is its target moved by ``shift`` of its width (the right class, ranked
    above every false one): IoU = (1 - shift) / (1 + shift) for each, a hit at each threshold below it."""
    iou = (1 - shift) / (1 + shift)
    return float(np.mean(COCO_IOU_THRESHOLDS <= iou))
