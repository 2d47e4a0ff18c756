"""Set prediction losses for Deformable DETR: sigmoid focal classification, L1 and GIoU box losses.

Shapes: N images, Lq queries per image, C classes (sigmoid, no background class),
K_i target boxes in image i, J = Σ matched pairs in the batch.
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from core.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from core.matcher import HungarianMatcher

_LOSS_NAMES = ("labels", "boxes", "cardinality")
# The weighted losses of one output set; aux and encoder copies add a suffix.
_BASE_WEIGHTED_KEYS = ("loss_ce", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al., 2017) summed over all elements and divided by the number of boxes.

    The authors compute `loss.mean(1).sum() / num_boxes` and then multiply by Lq; that is the same
    value as the plain sum over queries and classes divided by num_boxes, which is what this returns.

    Args:
        logits: (N, Lq, C) class logits.
        targets: (N, Lq, C) one-hot float targets (all zero for unmatched queries).
        num_boxes: normalizer, the average number of target boxes per worker.
        alpha: weight of positives in [0, 1]; negative to disable the alpha balancing.
        gamma: focusing exponent that down-weights easy examples.

    Returns:
        Scalar loss.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)  # probability given to the true value
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """Matches predictions to targets with the Hungarian matcher, then computes the requested losses.

    Args:
        num_classes: C, the number of object classes (no background class).
        matcher: the module pairing queries with targets.
        weight_dict: loss key -> weight, as built by build_weight_dict; kept for total_loss.
        losses: which of "labels", "boxes", "cardinality" to compute.
        focal_alpha: focal loss alpha.
        focal_gamma: focal loss gamma.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: Sequence[str] = _LOSS_NAMES,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        unknown = [name for name in losses if name not in _LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}, expected a subset of {list(_LOSS_NAMES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss_labels(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
        log: bool = True,
    ) -> dict[str, Tensor]:
        """Sigmoid focal loss over every query and class; matched queries target their box's class.

        Returns:
            "loss_ce": scalar. "class_error" (only when log): scalar, top-1 error in percent over matched
            queries, 0 when nothing was matched; a metric, not differentiable.
        """
        logits = outputs["pred_logits"].float()  # (N, Lq, C')
        # The class count comes from the logits, not self.num_classes: the two-stage encoder head may
        # be class-agnostic while still producing C outputs, as in the authors' code.
        n, q, c = logits.shape
        batch_idx, src_idx = _src_permutation_idx(indices)
        target_labels_matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        # Unmatched queries get the extra index c, whose one-hot column is dropped: all-zero targets.
        target_classes = torch.full((n, q), c, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = target_labels_matched
        target_onehot = F.one_hot(target_classes, c + 1)[..., :c].to(logits.dtype)  # (N, Lq, C'+1) -> (N, Lq, C')

        losses = {"loss_ce": sigmoid_focal_loss(logits, target_onehot, num_boxes, self.focal_alpha, self.focal_gamma)}
        if log:
            with torch.no_grad():
                if target_labels_matched.numel() == 0:
                    class_error = logits.new_zeros(())
                else:
                    predicted = logits[batch_idx, src_idx].argmax(-1)  # (J,)
                    class_error = 100.0 - 100.0 * (predicted == target_labels_matched).float().mean()
            losses["class_error"] = class_error
        return losses

    def loss_boxes(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """L1 and GIoU losses between matched predicted and target boxes.

        Returns:
            "loss_bbox": scalar, L1 on normalized cxcywh summed over matches / num_boxes.
            "loss_giou": scalar, (1 - GIoU) summed over matches / num_boxes.
        """
        batch_idx, src_idx = _src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()  # (J, 4) cxcywh
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)  # (J, 4)
        # With no matches these are sums over empty tensors: 0, yet still connected to pred_boxes,
        # so every worker's graph reaches the same parameters under DDP.
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @torch.no_grad()
    def loss_cardinality(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """Mean absolute error between the number of confident queries and of target boxes per image.

        A query counts as a detection when its highest class probability exceeds 0.5. (The authors
        kept DETR's softmax rule "argmax is not the last class", which means nothing without a
        background class.) A logged metric, not differentiable.

        Returns:
            "cardinality_error": scalar.
        """
        logits = outputs["pred_logits"]
        num_pred = (logits.amax(-1) > 0).sum(1).float()  # (N,); logit > 0 <=> probability > 0.5
        num_tgt = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)  # (N,)
        return {"cardinality_error": F.l1_loss(num_pred, num_tgt)}

    def get_loss(
        self,
        name: str,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
        log: bool = True,
    ) -> dict[str, Tensor]:
        """Computes one named loss ("labels", "boxes" or "cardinality") for one set of outputs."""
        if name == "labels":
            return self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        if name == "boxes":
            return self.loss_boxes(outputs, targets, indices, num_boxes)
        if name == "cardinality":
            return self.loss_cardinality(outputs, targets, indices, num_boxes)
        raise ValueError(f"unknown loss {name!r}, expected one of {list(_LOSS_NAMES)}")

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Computes all losses of the final layer, the auxiliary decoder layers and the encoder proposals.

        Args:
            outputs: "pred_logits" (N, Lq, C), "pred_boxes" (N, Lq, 4) normalized cxcywh; optionally
                "aux_outputs", a list of dicts with the same keys (earlier decoder layers), and
                "enc_outputs", a dict with the same keys (two-stage encoder proposals).
            targets: N dicts with "labels" (K_i,) int64 and "boxes" (K_i, 4) normalized cxcywh.

        Returns:
            Unweighted losses and metrics: "loss_ce", "class_error", "loss_bbox", "loss_giou",
            "cardinality_error" for the final layer (those of the requested losses); the same keys
            suffixed "_{i}" for aux_outputs[i] and "_enc" for enc_outputs, without "class_error".
            Scalars, float32.
        """
        # Loss math in float32 even when the model ran under bf16/fp16 autocast.
        device_type = outputs["pred_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
            final = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
            losses = self._losses_for(final, targets, num_boxes, suffix="", log=True)

            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update(self._losses_for(aux, targets, num_boxes, suffix=f"_{i}", log=False))

            if "enc_outputs" in outputs:
                # Encoder proposals are trained class-agnostically: every target becomes class 0.
                bin_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
                losses.update(
                    self._losses_for(outputs["enc_outputs"], bin_targets, num_boxes, suffix="_enc", log=False)
                )
        return losses

    def _losses_for(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], num_boxes: float, suffix: str, log: bool
    ) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            for key, value in self.get_loss(name, outputs, targets, indices, num_boxes, log=log).items():
                losses[key + suffix] = value
        return losses

    @staticmethod
    def num_boxes(targets: list[dict[str, Tensor]], device: torch.device | str = "cpu") -> float:
        """Average number of target boxes per worker, the normalizer of every loss.

        Averaging across workers keeps each worker's loss on the same scale, so the DDP gradient mean
        equals the gradient of the global loss. Clamped to 1 so a batch without objects is safe.
        """
        count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
            world_size = dist.get_world_size()
        return (count / world_size).clamp(min=1).item()

    def total_loss(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Weighted sum of loss_dict with this criterion's weight_dict; see total_loss."""
        return total_loss(loss_dict, self.weight_dict)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={list(self.losses)}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )


def _src_permutation_idx(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Flattens per-image matches into (image index, query index) pairs, each (J,) int64."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def total_loss(loss_dict: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """The training loss: Σ weight_dict[k] * loss_dict[k] over keys present in both.

    Metrics such as class_error have no weight and are left out; weights for losses not computed
    (e.g. "_enc" keys without two-stage) are ignored.

    Args:
        loss_dict: key -> scalar loss, as returned by SetCriterion.forward.
        weight_dict: key -> weight, as returned by build_weight_dict.

    Returns:
        Scalar loss.

    Raises:
        ValueError: no key of loss_dict has a weight, which would silently train on nothing.
    """
    keys = [k for k in loss_dict if k in weight_dict]
    if not keys:
        raise ValueError(
            f"no loss in loss_dict has a weight: loss keys {sorted(loss_dict)}, weight keys {sorted(weight_dict)}"
        )
    return sum(loss_dict[k] * weight_dict[k] for k in keys)


def build_weight_dict(
    cls_loss_coef: float = 2.0,
    bbox_loss_coef: float = 5.0,
    giou_loss_coef: float = 2.0,
    dec_layers: int = 6,
    aux_loss: bool = True,
    two_stage: bool = False,
) -> dict[str, float]:
    """Loss weights for the final layer, each auxiliary decoder layer and the two-stage proposals.

    Args:
        cls_loss_coef: weight of loss_ce.
        bbox_loss_coef: weight of loss_bbox.
        giou_loss_coef: weight of loss_giou.
        dec_layers: number of decoder layers; the first dec_layers - 1 are auxiliary.
        aux_loss: add "_{i}" keys for i in range(dec_layers - 1).
        two_stage: add "_enc" keys for the encoder proposals.

    Returns:
        Key -> weight, e.g. {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_ce_0": 2.0, ...}.
    """
    if dec_layers < 1:
        raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
    base = dict(zip(_BASE_WEIGHTED_KEYS, (cls_loss_coef, bbox_loss_coef, giou_loss_coef)))
    weight_dict = dict(base)
    suffixes = [f"_{i}" for i in range(dec_layers - 1)] if aux_loss else []
    if two_stage:
        suffixes.append("_enc")
    for suffix in suffixes:
        weight_dict.update({k + suffix: v for k, v in base.items()})
    return weight_dict
