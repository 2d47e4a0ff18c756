"""Hungarian matching of predicted queries to ground-truth boxes, one-to-one per image.

Shapes: N images, Lq queries per image, C classes (sigmoid, no background class),
K_i target boxes in image i, ΣK = Σ K_i target boxes in the batch.
"""

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from core.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Assigns each target box to one query by minimizing a weighted class + L1 + GIoU cost.

    Queries left unassigned are trained towards "no object" by the criterion's focal loss.

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance between normalized cxcywh boxes.
        cost_giou: weight of the negative generalized IoU.
        focal_alpha: focal loss alpha, the same as the criterion's so matching agrees with training.
        focal_gamma: focal loss gamma.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_class, cost_bbox, cost_giou must be non-zero, got all 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match predictions to targets image by image.

        Args:
            outputs: "pred_logits" (N, Lq, C) class logits; "pred_boxes" (N, Lq, 4) normalized cxcywh.
                Other keys are ignored.
            targets: N dicts with "labels" (K_i,) int64 in [0, C) and "boxes" (K_i, 4) normalized cxcywh.

        Returns:
            N pairs (src_idx, tgt_idx), each (min(Lq, K_i),) int64 on CPU: query src_idx[j] is matched to
            target tgt_idx[j]. Empty for an image without targets.
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if pred_logits.dim() != 3 or pred_boxes.shape[:2] != pred_logits.shape[:2] or pred_boxes.shape[-1] != 4:
            raise ValueError(
                "expected pred_logits (N, Q, C) and pred_boxes (N, Q, 4), got "
                f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}"
            )
        n, q, c = pred_logits.shape
        if len(targets) != n:
            raise ValueError(f"expected one target dict per image ({n}), got {len(targets)}")
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(n)]

        # Under bf16 autocast the sigmoid, log and GIoU would lose enough precision to flip close
        # assignments; the cost is cheap, so compute it in float32 whatever the model ran in.
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            prob = pred_logits.flatten(0, 1).float().sigmoid()  # (N, Lq, C) -> (N*Lq, C)
            boxes = pred_boxes.flatten(0, 1).float()  # (N, Lq, 4) -> (N*Lq, 4)
            tgt_labels = torch.cat([t["labels"] for t in targets]).to(prob.device)  # (ΣK,)
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(prob.device).float()  # (ΣK, 4)
            if tgt_labels.min() < 0 or tgt_labels.max() >= c:
                raise ValueError(
                    f"target labels must be in [0, {c}) for {c} classes, got range "
                    f"[{int(tgt_labels.min())}, {int(tgt_labels.max())}]"
                )

            # Focal cost: how much the focal loss would drop if this query predicted the target class,
            # i.e. the positive term minus the negative term it replaces, at the target's class only.
            # A negative alpha turns the balancing off, as in the criterion's focal loss.
            alpha, gamma, eps = self.focal_alpha, self.focal_gamma, 1e-8
            pos_w, neg_w = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)
            prob_t = prob[:, tgt_labels]  # (N*Lq, ΣK)
            neg_cost = neg_w * prob_t.pow(gamma) * -(1 - prob_t + eps).log()
            pos_cost = pos_w * (1 - prob_t).pow(gamma) * -(prob_t + eps).log()
            cost_class = pos_cost - neg_cost  # (N*Lq, ΣK)
            cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # (N*Lq, ΣK)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))

            cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
            # One batched cost (all queries x all targets) keeps the GPU busy with a few large kernels;
            # only the per-image diagonal blocks are used below.
            cost = cost.view(n, q, -1).cpu()  # (N*Lq, ΣK) -> (N, Lq, ΣK)

        if not torch.isfinite(cost).all():
            raise ValueError("matching cost has NaN or inf entries: the predictions are not finite")
        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            src, tgt = linear_sum_assignment(block[i].numpy())  # block[i]: (Lq, K_i)
            indices.append((torch.as_tensor(src, dtype=torch.int64), torch.as_tensor(tgt, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )
