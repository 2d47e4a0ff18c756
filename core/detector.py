"""Deformable DETR: backbone, multi-scale input projections, deformable transformer, class and box heads.

Legend (the repository's, see core/__init__.py): N batch, H x W padded image, L feature levels,
S = sum of the levels' Hl*Wl, Lq = num_queries, C = num_classes, Ld decoder layers; d_model is the
model width (the config's hidden_dim).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbone import Joiner, downsample_mask
from core.deformable_transformer import DeformableTransformer, inverse_sigmoid


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last).

    Args:
        input_dim: input features.
        hidden_dim: width of the hidden layers.
        output_dim: output features.
        num_layers: number of Linear layers.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class DeformableDETR(nn.Module):
    """The detector, in the authors' module layout so their state_dicts load unchanged.

    Variants:
        plain: one class head and one box head shared by all decoder layers (saved under every index).
        with_box_refine: one head per decoder layer; each layer's boxes become the next layer's
            reference points (detached).
        two_stage: every encoder position proposes a box with an extra head (index Ld); the top Lq
            proposals become the decoder's reference boxes and, through ``pos_trans``, its queries.
            Also works without box refinement (where the authors' code crashes): the shared heads
            then score the proposals too.

    Args:
        backbone: Joiner of ResNet and position encoding.
        transformer: the deformable transformer (its two_stage must match).
        num_classes: C sigmoid classes (no background).
        num_queries: Lq.
        num_feature_levels: L; levels beyond the backbone's are stride-2 3x3 convs on the last map.
        aux_loss: also return every earlier decoder layer's predictions.
        with_box_refine: iterative bounding box refinement.
        two_stage: two-stage Deformable DETR.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ) -> None:
        super().__init__()
        if transformer.two_stage != two_stage:
            raise ValueError(f"transformer.two_stage={transformer.two_stage} but two_stage={two_stage}")
        num_backbone_outs = len(backbone.strides)
        if num_feature_levels < num_backbone_outs or (num_feature_levels > 1 and num_backbone_outs == 1):
            raise ValueError(
                f"num_feature_levels={num_feature_levels} does not fit a backbone with {num_backbone_outs} outputs: "
                "use 1 with a C5-only backbone, or >= 3 with a C3-C5 backbone"
            )
        self.num_queries = num_queries
        self.transformer = transformer
        d_model = transformer.d_model
        class_embed = nn.Linear(d_model, num_classes)
        bbox_embed = MLP(d_model, d_model, 4, 3)
        self.num_feature_levels = num_feature_levels
        self.num_classes = num_classes
        # Assigned here only to keep the authors' key order: transformer, class_embed, bbox_embed, ...
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, d_model * 2)  # query position and content

        input_proj = []
        for in_channels in backbone.num_channels:
            input_proj.append(nn.Sequential(nn.Conv2d(in_channels, d_model, kernel_size=1), nn.GroupNorm(32, d_model)))
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - num_backbone_outs):
            input_proj.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, d_model, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d_model)
                )
            )
            in_channels = d_model
        self.input_proj = nn.ModuleList(input_proj)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        # Class prior 0.01 so the focal loss starts small; boxes start at the reference point.
        prior_prob = 0.01
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(class_embed.bias, bias_value)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # With two-stage, index Ld is the encoder's proposal head.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            # As the authors: only the first layer's box head starts with small boxes (w, h bias -2).
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            # Alias: the authors' checkpoints hold these heads under transformer.decoder.bbox_embed.* too.
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # One module under every index: state_dict saves it num_pred times, as the authors' does.
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
        if two_stage:
            # Alias: the authors' checkpoints hold the class heads under transformer.decoder.class_embed.* too.
            self.transformer.decoder.class_embed = self.class_embed
            # Boxes are refined from proposal boxes, which already have a size.
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """Detects objects in a padded batch.

        Args:
            images: (N, 3, H, W) normalized images, zero-padded to a common size.
            mask: (N, H, W) bool, True at padding.

        Returns:
            A dict:
            - "pred_logits": (N, Lq, C) class logits of the last decoder layer (sigmoid, no background).
            - "pred_boxes": (N, Lq, 4) boxes of the last layer, normalized cxcywh in [0, 1] relative to
              each image's valid (unpadded) size. float32.
            - "aux_outputs" (if aux_loss): list of Ld-1 dicts with "pred_logits" and "pred_boxes" of
              decoder layers 0..Ld-2, same shapes and formats.
            - "enc_outputs" (two-stage only): dict with "pred_logits" (N, S, C) proposal logits (only
              class 0 is trained, class-agnostically) and "pred_boxes" (N, S, 4) proposal boxes,
              normalized cxcywh, 1.0 at padded and border positions.
        """
        features, masks, pos = self.backbone(images, mask)
        srcs = [proj(feat) for proj, feat in zip(self.input_proj, features)]
        for lvl in range(len(srcs), self.num_feature_levels):
            # The first extra level reads the last backbone map; later ones the previous extra level.
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            m = downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](m).to(src.dtype))

        query_embed = None if self.two_stage else self.query_embed.weight
        out = self.transformer(
            srcs,
            masks,
            pos,
            query_embed,
            bbox_embed=self.bbox_embed if self.with_box_refine else None,
            proposal_heads=(self.class_embed[-1], self.bbox_embed[-1]) if self.two_stage else None,
        )
        hs, init_reference, inter_references = out.hs, out.init_reference, out.inter_references

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            tmp = self.bbox_embed[lvl](hs[lvl]).float()  # (N, Lq, 4) offset from the reference, logit space
            if reference.shape[-1] == 4:
                tmp = tmp + reference
            else:
                tmp = torch.cat([tmp[..., :2] + reference, tmp[..., 2:]], -1)
            outputs_coords.append(tmp.sigmoid())

        result = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        if self.aux_loss:
            result["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_classes[:-1], outputs_coords[:-1])
            ]
        if self.two_stage:
            result["enc_outputs"] = {
                "pred_logits": out.enc_outputs_class,
                "pred_boxes": out.enc_outputs_coord_unact.sigmoid(),
            }
        return result
