"""The input checks every kernel wrapper runs before it hands tensors over as raw pointers.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).
"""

from __future__ import annotations

import torch

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def coord_dtype(value: torch.Tensor) -> torch.dtype:
    """The dtype of locations, weights and offsets for ``value``'s dtype: float64 with float64, else float32."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def check_tensors(
    value: torch.Tensor,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
    **others: tuple[torch.Tensor, torch.dtype],
) -> None:
    """One line naming the tensor whose dtype, device or layout a kernel cannot take.

    Args:
        value: (N, S, M, D), its dtype one of ``dtypes``.
        device: where every tensor must be.
        others: name=(tensor, the dtype it must have).
    """
    if value.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"value must be {', '.join(names[:-1])} or {names[-1]}, got {value.dtype}")
    for name, (t, dtype) in {"value": (value, value.dtype), **others}.items():
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype} for {value.dtype} values, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES,
    device: torch.device | None = None,
) -> None:
    """The checks of the (unfused) op's five inputs; ``device`` defaults to ``value``'s."""
    coord = coord_dtype(value)
    check_tensors(
        value,
        dtypes,
        value.device if device is None else device,
        spatial_shapes=(spatial_shapes, torch.int64),
        level_start_index=(level_start_index, torch.int64),
        sampling_locations=(sampling_locations, coord),
        attention_weights=(attention_weights, coord),
    )
    N, _, M, _ = value.shape
    L = spatial_shapes.shape[0]
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or (loc_shape[0], loc_shape[2], loc_shape[3], loc_shape[5]) != (N, M, L, 2):
        raise ValueError(
            f"sampling_locations must have shape (N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2), got {loc_shape}"
        )
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"spatial_shapes must be (L, 2) and level_start_index (L,), got {tuple(spatial_shapes.shape)} "
            f"and {tuple(level_start_index.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must have shape {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
