"""``build_model``: the detector, its criterion and its post-processor from one validated DetrConfig."""

from __future__ import annotations

from collections.abc import Sequence

from core.backbone import build_backbone
from core.config import DetrConfig
from core.criterion import SetCriterion, build_weight_dict
from core.deformable_transformer import build_deformable_transformer
from core.detector import DeformableDETR
from core.matcher import HungarianMatcher
from core.postprocess import PostProcess


def build_detector(cfg: DetrConfig, load_backbone_weights: bool = True) -> DeformableDETR:
    """The DeformableDETR model of ``cfg.model``.

    Args:
        cfg: validated config.
        load_backbone_weights: load ``cfg.model.backbone_weights`` if set; False when the weights
            are about to be overwritten by a full checkpoint anyway.
    """
    m = cfg.model
    backbone = build_backbone(
        m.backbone,
        hidden_dim=m.hidden_dim,
        num_feature_levels=m.num_feature_levels,
        dilation=m.dilation,
        position_embedding_scale=m.position_embedding_scale,
        weights=m.backbone_weights if load_backbone_weights else None,
    )
    transformer = build_deformable_transformer(
        hidden_dim=m.hidden_dim,
        nheads=m.nheads,
        enc_layers=m.enc_layers,
        dec_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
        num_feature_levels=m.num_feature_levels,
        dec_n_points=m.dec_n_points,
        enc_n_points=m.enc_n_points,
        two_stage=m.two_stage,
        num_queries=m.num_queries,
    )
    return DeformableDETR(
        backbone,
        transformer,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_feature_levels=m.num_feature_levels,
        aux_loss=m.aux_loss,
        with_box_refine=m.with_box_refine,
        two_stage=m.two_stage,
    )


def build_criterion(cfg: DetrConfig) -> SetCriterion:
    """The Hungarian matcher and set losses of ``cfg.matcher`` and ``cfg.loss``."""
    matcher = HungarianMatcher(
        cost_class=cfg.matcher.set_cost_class,
        cost_bbox=cfg.matcher.set_cost_bbox,
        cost_giou=cfg.matcher.set_cost_giou,
        focal_alpha=cfg.loss.focal_alpha,
    )
    weight_dict = build_weight_dict(
        cls_loss_coef=cfg.loss.cls_loss_coef,
        bbox_loss_coef=cfg.loss.bbox_loss_coef,
        giou_loss_coef=cfg.loss.giou_loss_coef,
        dec_layers=cfg.model.dec_layers,
        aux_loss=cfg.model.aux_loss,
        two_stage=cfg.model.two_stage,
    )
    return SetCriterion(
        cfg.model.num_classes,
        matcher,
        weight_dict,
        losses=("labels", "boxes", "cardinality"),
        focal_alpha=cfg.loss.focal_alpha,
    )


NUM_DETECTIONS = 100  # detections kept per image: COCO's maxDets, as the authors do


def build_model(
    cfg: DetrConfig, load_backbone_weights: bool = True, label_map: Sequence[int] | None = None
) -> tuple[DeformableDETR, SetCriterion, PostProcess]:
    """Model, criterion and post-processor, as the authors' ``build`` returns them.

    Args:
        cfg: validated config (``DetrConfig.model_validate`` a dict to get one).
        load_backbone_weights: see build_detector.
        label_map: head label -> dataset category id for the post-processor (see PostProcess); None
            keeps the labels.

    Returns:
        (model, criterion, postprocessor): DeformableDETR on the CPU in train mode, SetCriterion
        (call ``criterion.total_loss`` on its output for the weighted sum), and PostProcess keeping
        the top NUM_DETECTIONS detections per image.
    """
    if not isinstance(cfg, DetrConfig):
        raise TypeError(f"cfg must be a DetrConfig, got {type(cfg).__name__}")
    return build_detector(cfg, load_backbone_weights), build_criterion(cfg), PostProcess(NUM_DETECTIONS, label_map)
