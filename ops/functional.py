"""The public ``ms_deform_attn`` op: input checks, backend choice and the torch custom-op registration.

Legend: N batch, S = sum_l H_l*W_l, M heads, D channels per head, Lq queries, L levels, P points.

The op is registered with ``torch.library`` as ``msda::forward`` / ``msda::backward`` so that
``torch.compile(fullgraph=True)`` sees one opaque node (with a fake implementation for shapes) and CUDA
graphs can capture it. On CUDA tensors it runs the CUDA kernel, on CPU tensors the CPU kernel, each
when it can be built. Where no kernel runs (another device, no compiler, backend "reference"), eager
calls skip the custom op and run the PyTorch reference under plain autograd, whose backward reuses
what the forward saved; only traced calls (torch.compile) keep the opaque op around the reference.
"""

from __future__ import annotations

import weakref

import torch

from ops.backend import check_deterministic, use_cpu_kernel, use_cuda_kernel, use_kernel
from ops.reference import ms_deform_attn_reference

# ---------------------------------------------------------------------------------------------
# Custom op registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("msda::forward", mutates_args=())
def _forward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_forward_op.register_kernel("cuda")
def _forward_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    if use_cuda_kernel(value.device):
        from ops.cuda import unfused as cuda_unfused

        return cuda_unfused.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_forward_op.register_kernel("cpu")
def _forward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    if use_cpu_kernel():
        from ops.cpu import unfused as cpu_unfused

        return cpu_unfused.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_forward_op.register_fake
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    return value.new_empty((N, Lq, M * D))


@torch.library.custom_op("msda::backward", mutates_args=())
def backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    need_grad_value: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _reference_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grads if need_grad_value else (value.new_empty(0), *grads[1:])


@backward_op.register_kernel("cuda")
def _backward_cuda(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, need_grad_value=True
):
    if use_cuda_kernel(value.device):
        from ops.cuda import unfused as cuda_unfused

        if need_grad_value:
            check_deterministic("ms_deform_attn's CUDA backward")
        # Without a gradient for value the kernel skips grad_value: no zero fill, no atomics, no conversion.
        return cuda_unfused.backward(
            grad_output.contiguous(),
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            need_grad_value=need_grad_value,
        )
    grads = _reference_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grads if need_grad_value else (value.new_empty(0), *grads[1:])


@backward_op.register_kernel("cpu")
def _backward_cpu(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, need_grad_value=True
):
    if use_cpu_kernel():
        from ops.cpu import unfused as cpu_unfused

        # The CPU kernel's grad_value has no write conflicts to save (one (n, m) pair per thread), so
        # it is always computed; dropped here when value needs none.
        grads = cpu_unfused.backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    else:
        grads = _reference_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return grads if need_grad_value else (value.new_empty(0), *grads[1:])


@backward_op.register_fake
def _backward_fake(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, need_grad_value=True
):
    grad_value = torch.empty_like(value) if need_grad_value else value.new_empty(0)
    return grad_value, torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _reference_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Gradients of the reference path inside the custom op, reached only by traced calls
    (torch.compile) and direct calls of ``torch.ops.msda.forward`` where no kernel runs: eager calls of
    ``ms_deform_attn`` take the reference under plain autograd instead. torch.func.vjp, which
    recomputes the forward, because plain autograd is switched off inside a custom op's kernel."""

    def forward(v, loc, attn):
        return ms_deform_attn_reference(v, spatial_shapes, level_start_index, loc, attn)

    with torch.enable_grad():
        _, vjp = torch.func.vjp(forward, value, sampling_locations, attention_weights)
        grads = vjp(grad_output.to(value.dtype))
    return tuple(g.contiguous() for g in grads)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    need_grad_value = ctx.needs_input_grad[0]
    grad_value, grad_loc, grad_attn = backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, need_grad_value
    )
    return grad_value if need_grad_value else None, None, None, grad_loc, grad_attn


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The last (spatial_shapes, level_start_index) pair whose values were checked, with their version
# counters and S. A detector passes the same two tensors to all of its attention layers, so on CUDA
# this reads them back (a device sync) once per forward instead of once per layer.
_last_checked: tuple | None = None


def _shape_error(name: str, expected: str, tensor: torch.Tensor) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Raise a ValueError/TypeError naming the bad argument and the expected shape or dtype."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise _shape_error("value", "(N, S, M, D)", value)
    N, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise _shape_error("spatial_shapes", "(L, 2) as (H, W)", spatial_shapes)
    L = spatial_shapes.shape[0]
    if L == 0:
        raise ValueError(
            f"spatial_shapes must hold at least one level (L >= 1), got shape {tuple(spatial_shapes.shape)}"
        )
    if level_start_index.shape != (L,):
        raise _shape_error("level_start_index", f"(L,) = ({L},)", level_start_index)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise _shape_error("sampling_locations", f"(N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2)", sampling_locations)
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    expected_loc = (N, Lq, M, L, P, 2)
    if tuple(sampling_locations.shape) != expected_loc:
        raise _shape_error("sampling_locations", f"(N, Lq, M, L, P, 2) = {expected_loc}", sampling_locations)
    if tuple(attention_weights.shape) != expected_loc[:-1]:
        raise _shape_error("attention_weights", f"(N, Lq, M, L, P) = {expected_loc[:-1]}", attention_weights)
    if value.dtype not in _VALUE_DTYPES:
        raise TypeError(f"value must be float32, float16, bfloat16 or float64, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if not named[name].is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {named[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].is_floating_point() or named[name].is_complex() or named[name].dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64), got {named[name].dtype}")
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}: all inputs must share a device")

    # The value-dependent checks read spatial_shapes back to the host; skip them where a sync is
    # impossible (CUDA graph capture) or would break the graph (torch.compile tracing).
    if torch.compiler.is_compiling():
        return
    if value.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    global _last_checked
    if spatial_shapes.is_inference() or level_start_index.is_inference():
        # Inference tensors keep no version counter, and checking them on every call cost a device
        # sync per layer (about 12 per image). They can only be changed in place inside inference
        # mode, so the data pointers stand in for the version; such an in-place edit goes unseen.
        key = ("inference", spatial_shapes.data_ptr(), level_start_index.data_ptr(), S)
    else:
        key = (spatial_shapes._version, level_start_index._version, S)
    if _last_checked is not None:
        shapes_ref, starts_ref, last_key = _last_checked
        if key is not None and shapes_ref() is spatial_shapes and starts_ref() is level_start_index and last_key == key:
            return
    shapes = spatial_shapes.tolist()
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes must hold positive (H, W) pairs, got {shapes}")
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(
            f"value has S={S} positions but spatial_shapes {shapes} sum to {total} (sum of H*W must equal S)"
        )
    starts = level_start_index.tolist()
    expected_starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    if starts != expected_starts:
        raise ValueError(f"level_start_index must be {expected_starts} for spatial_shapes {shapes}, got {starts}")
    if key is not None:
        _last_checked = (weakref.ref(spatial_shapes), weakref.ref(level_start_index), key)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Zhu et al., 2020).

    Args:
        value: (N, S, M, D) float32, float16, bfloat16 or float64.
        spatial_shapes: (L, 2) int64 (H, W) of each level; S must equal sum(H*W).
        level_start_index: (L,) int64 start of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y); (0, 0) is the top-left corner of
            the map and (1, 1) the bottom-right one. Kept in float32 (float64 with float64 values).
        attention_weights: (N, Lq, M, L, P), usually softmaxed over L*P. Kept in float32 like the locations.

    Returns:
        (N, Lq, M*D) in ``value``'s dtype.
    """
    validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if not torch.compiler.is_compiling() and not use_kernel(value.device):
        # Plain autograd over the reference: its backward reuses the sampled values saved by the
        # forward, where the custom op's backward would have to sample them again.
        return ms_deform_attn_reference(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations.to(coord_dtype),
            attention_weights.to(coord_dtype),
        )
    return _forward_op(
        value.contiguous(),
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        sampling_locations.to(coord_dtype).contiguous(),
        attention_weights.to(coord_dtype).contiguous(),
    )
