"""Validated configuration of the detector, matcher and loss, with the paper's defaults.

Field names follow the authors' argparse flags (fundamentalvision/Deformable-DETR ``main.py``) so a
released checkpoint's ``args`` maps onto ``ModelConfig`` one to one. Training settings (learning
rates, epochs, data) live in the pipelines' own config sections, not here.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


class ModelConfig(BaseModel):
    """Sizes and switches of the Deformable DETR model (defaults: the paper's ResNet-50 model)."""

    model_config = ConfigDict(extra="forbid")

    # Backbone
    backbone: BackboneName = "resnet50"
    backbone_weights: str | None = Field(
        default=None,
        description="torchvision-layout ResNet state_dict to start from: a local path or an http(s) URL; "
        "None keeps a random initialization.",
    )
    dilation: bool = Field(default=False, description="DC5: replace the stride of the last stage by dilation.")
    position_embedding_scale: float = Field(default=2 * math.pi, gt=0)
    num_feature_levels: int = Field(default=4, ge=1)

    # Transformer
    enc_layers: int = Field(default=6, ge=1)
    dec_layers: int = Field(default=6, ge=1)
    dim_feedforward: int = Field(default=1024, ge=1)
    hidden_dim: int = Field(default=256, ge=32)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    nheads: int = Field(default=8, ge=1)
    num_queries: int = Field(default=300, ge=1)
    dec_n_points: int = Field(default=4, ge=1)
    enc_n_points: int = Field(default=4, ge=1)

    # Variants and heads
    with_box_refine: bool = False
    two_stage: bool = False
    num_classes: int = Field(default=91, ge=1, description="Sigmoid classes, no background; 91 = COCO ids.")
    aux_loss: bool = True

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(
                f"hidden_dim must be divisible by nheads, got hidden_dim={self.hidden_dim}, nheads={self.nheads}"
            )
        if self.hidden_dim % 32 != 0:
            # The input projections use GroupNorm(32, hidden_dim).
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32)), got hidden_dim={self.hidden_dim}")
        if self.num_feature_levels == 2:
            # With more than one level the backbone gives C3-C5 (3 maps); extra levels are added on top.
            raise ValueError("num_feature_levels must be 1 (C5 only) or >= 3 (C3-C5 plus extra stride-2 levels), got 2")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation=True needs a bottleneck ResNet (resnet50/101), got backbone={self.backbone!r}")
        return self

    def architecture_differences(
        self, other: ModelConfig, labels: tuple[str, str], *, with_classes: bool = False
    ) -> list[str]:
        """The fields in which ``other`` builds weights that ``self``'s do not fit: ``"num_queries: checkpoint
        10, config 12"`` for labels ("checkpoint", "config").

        ``num_queries`` counts unless two-stage makes the queries from proposals; ``num_classes`` with
        ``with_classes`` (a fine-tune re-initializes the class heads, a resumed run cannot).
        """
        names = [*ARCH_FIELDS, *(() if self.two_stage and other.two_stage else ("num_queries",))]
        names += ["num_classes"] if with_classes else []
        mine, theirs = labels
        return [
            f"{n}: {mine} {getattr(self, n)!r}, {theirs} {getattr(other, n)!r}"
            for n in names
            if getattr(self, n) != getattr(other, n)
        ]


# The model fields that shape its weights (num_queries too, unless two-stage; num_classes the heads').
ARCH_FIELDS = (
    "backbone",
    "dilation",
    "num_feature_levels",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "nheads",
    "dec_n_points",
    "enc_n_points",
    "with_box_refine",
    "two_stage",
)


class MatcherConfig(BaseModel):
    """Weights of the Hungarian matching cost."""

    model_config = ConfigDict(extra="forbid")

    set_cost_class: float = Field(default=2.0, ge=0)
    set_cost_bbox: float = Field(default=5.0, ge=0)
    set_cost_giou: float = Field(default=2.0, ge=0)

    @model_validator(mode="after")
    def _check_not_all_zero(self) -> MatcherConfig:
        if self.set_cost_class == 0 and self.set_cost_bbox == 0 and self.set_cost_giou == 0:
            raise ValueError("at least one of set_cost_class, set_cost_bbox, set_cost_giou must be > 0, got all 0")
        return self


class LossConfig(BaseModel):
    """Loss weights and the focal loss alpha."""

    model_config = ConfigDict(extra="forbid")

    cls_loss_coef: float = Field(default=2.0, ge=0)
    bbox_loss_coef: float = Field(default=5.0, ge=0)
    giou_loss_coef: float = Field(default=2.0, ge=0)
    focal_alpha: float = Field(default=0.25, le=1.0, description="In [0, 1]; negative disables alpha balancing.")


class DetrConfig(BaseModel):
    """Everything ``build_model`` needs: model, matcher and loss sections."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    loss: LossConfig = Field(default_factory=LossConfig)

    def variant(self) -> str:
        """Short name of the model variant: plain, with_box_refine, two_stage or with_box_refine_two_stage."""
        m = self.model
        if m.with_box_refine and m.two_stage:
            return "with_box_refine_two_stage"
        if m.with_box_refine:
            return "with_box_refine"
        if m.two_stage:
            return "two_stage"
        return "plain"
