"""Host side of the CPU kernel: input checks, then ``msda_cpu_forward``/``backward`` on raw pointers.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level). The library is built and loaded by ``ops.cpu.build``.
"""

from __future__ import annotations

import torch

from ops._checks import check_inputs
from ops.cpu.build import load

# dtype code of the C interface for each value dtype the kernel stores natively; float16 values
# are computed in float32 (see forward).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float64: 3}
_CPU = torch.device("cpu")
_ERRORS = {1: "sizes the kernel cannot index, or an unknown dtype", 2: "out of memory for scratch buffers"}


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: {_ERRORS.get(code, f'error code {code}')}")


def forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Run the forward kernel.

    Args:
        value: (N, S, M, D) float32/bfloat16/float64 (float16 is computed in float32), contiguous, CPU.
        spatial_shapes: (L, 2) int64 (H, W).
        level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, P, 2) float32 (float64 for float64 values).
        attention_weights: (N, Lq, M, L, P), same dtype as sampling_locations.
        num_threads: worker threads; default ``torch.get_num_threads()``. The result does not depend on it.

    Returns:
        (N, Lq, M*D) in value's dtype.
    """
    if value.dtype == torch.float16:  # no native half arithmetic on most CPUs
        return forward(value.float(), spatial_shapes, level_start_index, sampling_locations, attention_weights).half()
    check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, tuple(DTYPE_CODES), _CPU
    )
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    output = torch.empty((N, Lq, M * D), dtype=value.dtype)  # fully written
    code = load().msda_cpu_forward(
        DTYPE_CODES[value.dtype],
        value.data_ptr(),
        spatial_shapes.data_ptr(),
        level_start_index.data_ptr(),
        sampling_locations.data_ptr(),
        attention_weights.data_ptr(),
        output.data_ptr(),
        N,
        S,
        M,
        D,
        Lq,
        L,
        P,
        num_threads or torch.get_num_threads(),
    )
    _check(code, "msda_cpu_forward")
    return output


def backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``forward`` with respect to value, sampling_locations and attention_weights.

    Args:
        grad_output: (N, Lq, M*D) in value's dtype.
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, num_threads: as in forward.

    Returns:
        grad_value (N, S, M, D) in value's dtype, grad_sampling_locations (N, Lq, M, L, P, 2) and
        grad_attention_weights (N, Lq, M, L, P) in the locations' dtype.
    """
    if value.dtype == torch.float16:
        grads = backward(
            grad_output.float(), value.float(), spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grads[0].half(), grads[1], grads[2]
    check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, tuple(DTYPE_CODES), _CPU
    )
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    grad_output = grad_output.to(value.dtype).contiguous()
    if grad_output.numel() != N * Lq * M * D:
        raise ValueError(f"grad_output must have N*Lq*M*D = {N * Lq * M * D} elements, got {tuple(grad_output.shape)}")
    # grad_value accumulates in float32 (float64 for float64) whatever value's dtype, from zero.
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_dtype)
    grad_loc = torch.empty_like(sampling_locations)  # written once per element by the kernel
    grad_attn = torch.empty_like(attention_weights)
    code = load().msda_cpu_backward(
        DTYPE_CODES[value.dtype],
        grad_output.data_ptr(),
        value.data_ptr(),
        spatial_shapes.data_ptr(),
        level_start_index.data_ptr(),
        sampling_locations.data_ptr(),
        attention_weights.data_ptr(),
        grad_value.data_ptr(),
        grad_loc.data_ptr(),
        grad_attn.data_ptr(),
        N,
        S,
        M,
        D,
        Lq,
        L,
        P,
        num_threads or torch.get_num_threads(),
    )
    _check(code, "msda_cpu_backward")
    return grad_value.to(value.dtype), grad_loc, grad_attn
