"""Pure-PyTorch multi-scale deformable attention: the truth the CUDA kernel is tested against.

Legend: N batch, S = sum_l H_l*W_l flattened value positions, M heads, D channels per head,
Lq queries, L levels, P sampling points per (head, level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear multi-scale deformable attention built on ``grid_sample``.

    Runs on any device and is differentiable by autograd. Sampling follows the paper's reference:
    a normalized location (x, y) reads pixel (x*W - 0.5, y*H - 0.5) of its level, i.e.
    ``grid_sample(align_corners=False)``, and positions outside the map read zeros.

    Args:
        value: (N, S, M, D) float tensor.
        spatial_shapes: (L, 2) integer tensor of (H, W) per level.
        level_start_index: (L,) offsets of each level in S. Unused here (levels are contiguous and
            ordered), kept so the signature matches the public op.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M*D) tensor in ``value``'s dtype. Half-precision values are computed in float32.
    """
    del level_start_index  # the split below follows spatial_shapes, which implies the offsets
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if spatial_shapes.shape[0] == 0:  # else torch.stack([]) below fails with a message naming nothing
        raise ValueError(
            f"spatial_shapes must hold at least one level (L >= 1), got shape {tuple(spatial_shapes.shape)}"
        )
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    if compute_dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    out_dtype = value.dtype

    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.to(compute_dtype).split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1]; with align_corners=False, -1 is the left edge of
    # pixel 0, which is exactly the paper's x*W - 0.5 convention.
    grids = 2.0 * sampling_locations.to(compute_dtype) - 1.0
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N, M, D, H*W) -> (N*M, D, H, W)
        v = value_levels[level].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        # -> (N*M, D, Lq, P)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    # stack -> (N*M, D, Lq, L, P) -> (N*M, D, Lq, L*P); weighted sum -> (N*M, D, Lq)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    # (N*M, D, Lq) -> (N, M*D, Lq) -> (N, Lq, M*D)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(out_dtype)
