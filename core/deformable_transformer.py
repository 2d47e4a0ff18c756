"""Deformable transformer: multi-scale deformable encoder, decoder with deformable cross-attention, two-stage proposals.

Legend (the repository's, see core/__init__.py): N batch, L levels, Hl x Wl level l, S = sum_l Hl*Wl
flattened positions, Lq queries, M heads, D = d_model / M head dim, P sampling points, Ld decoder
layers; d_model (the authors' hidden_dim) and d_ffn (their dim_feedforward) are written out.

Reference points are normalized to the valid (unpadded) image: (x, y) in [0, 1], or boxes
(cx, cy, w, h) in [0, 1]. They are kept in float32 under autocast; the attention op samples at them.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops import MSDeformAttn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both terms to >= eps, as the authors compute it."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def level_table(shapes: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    """(L, 2) int64 (Hl, Wl) on ``device``, built from the sizes one scalar at a time: under torch.export
    the sizes are symbols that ``torch.as_tensor`` would freeze to the example's values, which makes
    the exported program accept only the example's image size. Each scalar is filled on the device, not
    copied from the host: a CUDA graph's capture forbids such a copy (the forward stays capturable)."""
    return torch.stack(
        [torch.stack([torch.scalar_tensor(d, dtype=torch.long, device=device) for d in hw]) for hw in shapes]
    )


def _get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN; post-norm.

    Args:
        d_model: the model width (M * D).
        d_ffn: FFN hidden width.
        dropout: dropout after attention and inside/after the FFN.
        n_levels: L.
        n_heads: M.
        n_points: P.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src, pos: (N, S, d_model); reference_points: (N, S, L, 2); padding_mask: (N, S). Returns (N, S, d_model)."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers; every position attends from its own location on every level.

    Args:
        encoder_layer: copied num_layers times.
        num_layers: number of layers.
    """

    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalized to the valid area, then projected onto every level.

        Args:
            shapes: L (Hl, Wl) pairs.
            valid_ratios: (N, L, 2) valid fraction (w, h) of each level.

        Returns:
            (N, S, L, 2) normalized (x, y).
        """
        device = valid_ratios.device
        reference_points_list = []
        for lvl, (h, w) in enumerate(shapes):
            # arange, not linspace: equal values, and under torch.export it keeps h and w symbolic.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (N, Hl*Wl)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))  # (N, Hl*Wl, 2)
        reference_points = torch.cat(reference_points_list, 1)  # (N, S, 2)
        return reference_points[:, :, None] * valid_ratios[:, None]  # (N, S, 1, 2) * (N, 1, L, 2) -> (N, S, L, 2)

    def forward(
        self,
        src: Tensor,
        shapes: list[tuple[int, int]],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src, pos: (N, S, d_model); valid_ratios: (N, L, 2); padding_mask: (N, S). Returns memory (N, S, d_model)."""
        reference_points = self.get_reference_points(shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention into the encoder memory, FFN; post-norm.

    Args:
        d_model: the model width (M * D).
        d_ffn: FFN hidden width.
        dropout: dropout in attention and FFN.
        n_levels: L.
        n_heads: M (both attentions).
        n_points: P.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        src_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos: (N, Lq, d_model); reference_points: (N, Lq, L, 2|4); src: (N, S, d_model). Returns (N, Lq, d_model)."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]  # SDPA path
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, src, spatial_shapes, level_start_index, src_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output and reference points.

    With box heads passed to ``forward`` (iterative box refinement) each layer's box prediction
    becomes the next layer's reference, detached so each layer learns its own correction.

    ``DeformableDETR`` also registers its heads here as ``bbox_embed`` (box refinement) and
    ``class_embed`` (two-stage): the authors' checkpoints store those aliases, so their keys must exist.

    Args:
        decoder_layer: copied num_layers times.
        num_layers: Ld.
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Tensor,
        src_padding_mask: Tensor | None = None,
        bbox_embed: nn.ModuleList | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Runs all layers.

        Args:
            tgt: (N, Lq, d_model) query content.
            reference_points: (N, Lq, 2) points or (N, Lq, 4) boxes, normalized to the valid area.
            src: (N, S, d_model) encoder memory.
            spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            valid_ratios: (N, L, 2).
            query_pos: (N, Lq, d_model) query position embedding.
            src_padding_mask: (N, S) bool.
            bbox_embed: per-layer box heads for iterative refinement, or None.

        Returns:
            hs: (Ld, N, Lq, d_model) every layer's output; references: (Ld, N, Lq, 2|4) the reference each
            layer's output refines next (equal to the input reference without refinement).
        """
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                # (N, Lq, 1, 4) * (N, 1, L, 4) -> (N, Lq, L, 4)
                reference_points_input = (
                    reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
                )
            else:
                reference_points_input = reference_points[:, :, None] * valid_ratios[:, None]  # -> (N, Lq, L, 2)
            output = layer(
                output, query_pos, reference_points_input, src, spatial_shapes, level_start_index, src_padding_mask
            )

            if bbox_embed is not None:
                tmp = bbox_embed[lid](output)  # (N, Lq, 4) offsets in logit space
                if reference_points.shape[-1] == 4:
                    new_reference_points = tmp + inverse_sigmoid(reference_points)
                else:
                    new_reference_points = torch.cat(
                        [tmp[..., :2] + inverse_sigmoid(reference_points), tmp[..., 2:]], -1
                    )
                reference_points = new_reference_points.sigmoid().detach()

            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


class TransformerOutput(NamedTuple):
    """What DeformableTransformer.forward returns.

    hs: (Ld, N, Lq, d_model) decoder outputs of every layer.
    init_reference: (N, Lq, 2|4) the first layer's reference points (boxes in two-stage).
    inter_references: (Ld, N, Lq, 2|4) the reference points after each layer.
    enc_outputs_class: (N, S, num_classes) two-stage proposal logits, else None.
    enc_outputs_coord_unact: (N, S, 4) two-stage proposal boxes before sigmoid (inf at padding), else None.
    """

    hs: Tensor
    init_reference: Tensor
    inter_references: Tensor
    enc_outputs_class: Tensor | None
    enc_outputs_coord_unact: Tensor | None


class DeformableTransformer(nn.Module):
    """Encoder over all feature levels, then a decoder of learned (or, two-stage, proposed) queries.

    Args:
        d_model: the model width (M * D).
        n_heads: M.
        num_encoder_layers: encoder depth.
        num_decoder_layers: Ld.
        d_ffn: FFN width.
        dropout: dropout everywhere.
        num_feature_levels: L.
        dec_n_points: P in the decoder's cross-attention.
        enc_n_points: P in the encoder's self-attention.
        two_stage: queries come from the top encoder proposals instead of learned embeddings.
        two_stage_num_proposals: how many proposals become queries (= num_queries).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, d_ffn, dropout, num_feature_levels, n_heads, enc_n_points
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, d_ffn, dropout, num_feature_levels, n_heads, dec_n_points
        )
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine embedding of proposal boxes: (N, Lq, 4) logits -> (N, Lq, 2·d_model)."""
        num_pos_feats = self.d_model // 2  # 4 coordinates x d_model/2 = 2·d_model, the width of pos_trans
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        proposals = proposals.sigmoid() * scale  # (N, Lq, 4)
        pos = proposals[:, :, :, None] / dim_t  # (N, Lq, 4, d_model/2)
        # (N, Lq, 4, d_model/4, 2) -> (N, Lq, 2·d_model)
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(
        self, memory: Tensor, memory_padding_mask: Tensor, shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """One proposal per encoder position: a box centred on the pixel, 0.05 * 2^l wide on level l.

        Args:
            memory: (N, S, d_model) encoder output.
            memory_padding_mask: (N, S) bool.
            shapes: L (Hl, Wl) pairs.

        Returns:
            output_memory: (N, S, d_model) normalized memory, zero at padding and at border proposals;
            output_proposals: (N, S, 4) proposal boxes in logit space, inf where invalid.
        """
        n = memory.shape[0]
        proposals = []
        cur = 0
        for lvl, (h, w) in enumerate(shapes):
            mask_flatten_ = memory_padding_mask[:, cur : cur + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask_flatten_[:, :, 0, 0], 1)  # (N,)
            valid_w = torch.sum(~mask_flatten_[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)  # (Hl, Wl, 2)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale  # (N, Hl, Wl, 2)
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))  # (N, Hl*Wl, 4)
            cur += h * w
        output_proposals = torch.cat(proposals, 1)  # (N, S, 4)
        output_proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~output_proposals_valid, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~output_proposals_valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """(N, Hl, Wl) padding mask -> (N, 2) valid fraction (w, h)."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos_embeds: list[Tensor],
        query_embed: Tensor | None = None,
        bbox_embed: nn.ModuleList | None = None,
        proposal_heads: tuple[nn.Module, nn.Module] | None = None,
    ) -> TransformerOutput:
        """Encodes the feature levels and decodes the queries.

        Args:
            srcs: L projected maps (N, d_model, Hl, Wl).
            masks: L padding masks (N, Hl, Wl) bool.
            pos_embeds: L position encodings (N, d_model, Hl, Wl).
            query_embed: (Lq, 2·d_model) learned query position and content (not used in two-stage).
            bbox_embed: per-layer box heads for iterative refinement, or None.
            proposal_heads: two-stage (class head, box head) scoring every encoder position.

        Returns:
            TransformerOutput.
        """
        if self.two_stage and proposal_heads is None:
            raise ValueError("two_stage=True needs proposal_heads=(class head, box head)")
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage=True")

        src_flatten, mask_flatten, lvl_pos_embed_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            h, w = src.shape[-2:]
            shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))  # (N, d_model, Hl, Wl) -> (N, Hl*Wl, d_model)
            mask_flatten.append(mask.flatten(1))  # (N, Hl, Wl) -> (N, Hl*Wl)
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)  # (N, S, d_model)
        mask_flatten = torch.cat(mask_flatten, 1)  # (N, S)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)  # (N, S, d_model)
        spatial_shapes = level_table(shapes, src_flatten.device)  # (L, 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)  # (N, L, 2)

        memory = self.encoder(
            src_flatten, shapes, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed_flatten, mask_flatten
        )

        n, s, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            class_head, box_head = proposal_heads
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, shapes)
            enc_outputs_class = class_head(output_memory)  # (N, S, num_classes)
            enc_outputs_coord_unact = box_head(output_memory) + output_proposals  # (N, S, 4)
            topk = self.two_stage_num_proposals
            message = f"two-stage needs num_queries <= encoder positions, got num_queries={topk} > S={s}"
            if isinstance(s, int):
                if topk > s:
                    raise ValueError(message)
            else:  # S is a symbol under torch.export: a check at run time, not a guard that fixes S
                torch._check(topk <= s, lambda: message)
            # The authors rank proposals by the first class's logit (the encoder head is trained class-agnostically).
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]  # (N, Lq)
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            topk_coords_unact = topk_coords_unact.detach()  # (N, Lq, 4)
            reference_points = topk_coords_unact.sigmoid()
            # The sine embedding is float32; a model cast to half precision takes it in its weights' dtype.
            proposal_embed = self.get_proposal_pos_embed(topk_coords_unact).to(self.pos_trans.weight.dtype)
            pos_trans_out = self.pos_trans_norm(self.pos_trans(proposal_embed))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)  # (N, Lq, 2·d_model) -> 2 x (N, Lq, d_model)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)  # (Lq, 2·d_model) -> 2 x (Lq, d_model)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            reference_points = self.reference_points(query_pos).float().sigmoid()  # (N, Lq, 2)
        init_reference = reference_points

        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flatten,
            bbox_embed,
        )
        return TransformerOutput(hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact)


def build_deformable_transformer(
    d_model: int,
    n_heads: int,
    enc_layers: int,
    dec_layers: int,
    d_ffn: int,
    dropout: float,
    num_feature_levels: int,
    dec_n_points: int,
    enc_n_points: int,
    two_stage: bool,
    num_queries: int,
) -> DeformableTransformer:
    """DeformableTransformer from the model config's sizes (``enc_layers``/``dec_layers`` as the authors' flags)."""
    return DeformableTransformer(
        d_model=d_model,
        n_heads=n_heads,
        num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        d_ffn=d_ffn,
        dropout=dropout,
        num_feature_levels=num_feature_levels,
        dec_n_points=dec_n_points,
        enc_n_points=enc_n_points,
        two_stage=two_stage,
        two_stage_num_proposals=num_queries,
    )
