"""``MSDeformAttn``: the multi-scale deformable attention layer with the authors' parameter names.

Legend: N batch, Lq queries, S = sum_l H_l*W_l flattened input positions,
M heads, D = d_model / M channels per head, L levels, P sampling points per (head, level).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ops.fused import ms_deform_attn_composed, ms_deform_attn_fused


class MSDeformAttn(nn.Module):
    """Each query samples P points per head and level around its reference point and mixes them
    with softmaxed weights; offsets and weights come from linear layers on the query.

    Args:
        d_model: channels of queries and values; must be divisible by ``n_heads``.
        n_levels: number of feature levels L.
        n_heads: number of attention heads M.
        n_points: sampling points P per head and level.
    """

    # False: softmax and locations in PyTorch, then the unfused op (the layer before the fused
    # kernel); benchmarks flip it to time a whole model both ways. The outputs agree either way.
    fused: bool = True

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        M, L, P = self.n_heads, self.n_levels, self.n_points
        # Offsets start as a fixed pattern, not noise: head m looks along direction 2*pi*m/M, its
        # direction vector scaled so the larger coordinate is 1, and point p sits p+1 steps out.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (M, 2)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
        bias = directions.view(M, 1, 1, 2) * steps  # (M, 1, P, 2)
        bias = bias.expand(M, L, P, 2)  # the same ring on every level
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        # Zero weights: every sampling point starts with the same attention.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to its sampling points.

        Args:
            query: (N, Lq, d_model).
            reference_points: (N, Lq, L, 2) normalized (x, y) points, or (N, Lq, L, 4) normalized
                (cx, cy, w, h) boxes, in which case offsets are scaled by half the box size over P.
            input_flatten: (N, S, d_model) the flattened feature levels.
            input_spatial_shapes: (L, 2) int64 (H, W) per level.
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True at padding; padded values are zeroed.

        Returns:
            (N, Lq, d_model).
        """
        M, L, P = self.n_heads, self.n_levels, self.n_points
        d_model = self.d_model
        if query.dim() != 3 or query.shape[-1] != d_model:
            raise ValueError(f"query must have shape (N, Lq, {d_model}), got {tuple(query.shape)}")
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != d_model:
            raise ValueError(f"input_flatten must have shape ({N}, S, {d_model}), got {tuple(input_flatten.shape)}")
        S = input_flatten.shape[1]
        if (
            reference_points.dim() != 4
            or tuple(reference_points.shape[:3]) != (N, Lq, L)
            or reference_points.shape[-1] not in (2, 4)
        ):
            raise ValueError(
                f"reference_points must have shape ({N}, {Lq}, {L}, 2) or ({N}, {Lq}, {L}, 4), got {tuple(reference_points.shape)}"
            )
        if tuple(input_spatial_shapes.shape) != (L, 2):
            raise ValueError(
                f"input_spatial_shapes must have shape ({L}, 2) for n_levels={L}, got {tuple(input_spatial_shapes.shape)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if tuple(input_padding_mask.shape) != (N, S) or input_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"input_padding_mask must be a bool tensor of shape ({N}, {S}), got {input_padding_mask.dtype} {tuple(input_padding_mask.shape)}"
                )
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, d_model // M)  # (N, S, d_model) -> (N, S, M, D)

        # Offsets, logits and locations stay in float32 even under autocast: a bf16 location is off
        # by up to a pixel on a 150-wide map. The softmax over L*P and `reference + offset / (W, H)`
        # (or the box form) happen inside the fused op: on CUDA in the kernel, which so never writes
        # the (N, Lq, M, L, P, 2) locations and (N, Lq, M, L, P) weights out to memory.
        offsets = self.sampling_offsets(query).float().view(N, Lq, M, L, P, 2)
        logits = self.attention_weights(query).float().view(N, Lq, M, L, P)
        attend = ms_deform_attn_fused if self.fused else ms_deform_attn_composed
        out = attend(value, input_spatial_shapes, input_level_start_index, reference_points.float(), offsets, logits)
        return self.output_proj(out.to(value.dtype))
