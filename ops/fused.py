"""``ms_deform_attn_fused``: deformable attention from the raw offsets and attention logits (softmax and
sampling locations computed inside the op), with gradients for the raw inputs.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Registered as ``msda::fused_forward`` / ``msda::fused_backward``. Off the GPU (and on a GPU where the
fused kernel cannot run) both run the PyTorch composition below: the softmax over L*P and the location
arithmetic of ``MSDeformAttn`` in PyTorch, then the unfused ``ms_deform_attn`` op. That composition is
also the definition the fused CUDA kernel (``csrc/ms_deform_attn_fused.cu``) is tested against.
"""

from __future__ import annotations

import logging

import torch

from ops.backend import check_deterministic, use_fused_kernel
from ops.functional import backward_op, ms_deform_attn, validate

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The composition: the definition of the fused op in PyTorch
# ---------------------------------------------------------------------------------------------


def _level_normalizer(spatial_shapes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(L, 2) (W, H) of each level: point offsets are in pixels of their level."""
    return spatial_shapes.flip(-1).to(dtype)


def sampling_locations_of(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """Normalized sampling locations from reference points and raw offsets.

    Points (N, Lq, L, 2): ``ref + offset / (W_l, H_l)``. Boxes (N, Lq, L, 4) as (cx, cy, w, h):
    ``centre + offset / P * (w, h) / 2``. Returns (N, Lq, M, L, P, 2) in the offsets' dtype.
    """
    ref = reference_points.to(offsets.dtype)[:, :, None, :, None, :]  # (N, Lq, L, 2|4) -> (N, Lq, 1, L, 1, 2|4)
    if reference_points.shape[-1] == 2:
        normalizer = _level_normalizer(spatial_shapes, offsets.dtype)[None, None, None, :, None, :]
        return ref + offsets / normalizer
    P = offsets.shape[4]
    return ref[..., :2] + offsets / P * ref[..., 2:] * 0.5


def attention_weights_of(attention_logits: torch.Tensor) -> torch.Tensor:
    """Softmax of (N, Lq, M, L, P) logits over each head's L*P points; same shape."""
    N, Lq, M, L, P = attention_logits.shape
    return attention_logits.reshape(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)


def ms_deform_attn_composed(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """The fused op as separate PyTorch steps (differentiable by autograd). Arguments as in
    ``ms_deform_attn_fused``."""
    locations = sampling_locations_of(reference_points, offsets, spatial_shapes)
    weights = attention_weights_of(attention_logits)
    return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def _reference_gradient(grad_locations, reference_points, offsets):
    """d loss / d reference_points (N, Lq, L, R) from d loss / d location (N, Lq, M, L, P, 2): the
    location is linear in the reference point, so sum over heads and points (and, for boxes,
    d location / d (w, h) = offset / P / 2)."""
    P = offsets.shape[4]
    sum_mp = grad_locations.sum(dim=(2, 4))  # (N, Lq, M, L, P, 2) -> (N, Lq, L, 2)
    if reference_points.shape[-1] == 2:
        return sum_mp.to(reference_points.dtype)
    grad_size = (grad_locations * offsets).sum(dim=(2, 4)) * 0.5 / P
    return torch.cat([sum_mp, grad_size], -1).to(reference_points.dtype)  # (N, Lq, L, 4)


def _composed_backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    offsets,
    attention_logits,
    need_value_grad=True,
):
    """Gradients of the composition for its raw inputs: the unfused op's backward, then the chain
    rule through the location arithmetic and the softmax written out (the fused kernel's backward
    does the same per point)."""
    P = offsets.shape[4]
    locations = sampling_locations_of(reference_points, offsets, spatial_shapes)
    weights = attention_weights_of(attention_logits)
    grad_value, grad_loc, grad_weights = backward_op(
        grad_output, value, spatial_shapes, level_start_index, locations, weights, need_value_grad
    )
    # Softmax over each head's L*P points: dlogit_i = a_i * (da_i - sum_j a_j da_j).
    dot = (weights * grad_weights).flatten(-2).sum(-1)[..., None, None]  # (N, Lq, M, 1, 1)
    grad_logits = weights * (grad_weights - dot)
    if reference_points.shape[-1] == 2:
        grad_offsets = grad_loc / _level_normalizer(spatial_shapes, offsets.dtype)[None, None, None, :, None, :]
    else:
        half_size = reference_points.to(offsets.dtype)[:, :, None, :, None, 2:] * 0.5  # (N, Lq, 1, L, 1, 2)
        grad_offsets = grad_loc * half_size / P
    return grad_value, _reference_gradient(grad_loc, reference_points, offsets), grad_offsets, grad_logits


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("msda::fused_forward", mutates_args=())
def _fused_forward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    return ms_deform_attn_composed(
        value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits
    )


@_fused_forward_op.register_kernel("cuda")
def _fused_forward_cuda(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits):
    if use_fused_kernel(value.device):
        from ops.cuda import fused as cuda_fused

        return cuda_fused.forward(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits)
    return ms_deform_attn_composed(
        value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits
    )


@_fused_forward_op.register_fake
def _fused_forward_fake(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits):
    N, _, M, D = value.shape
    return value.new_empty((N, offsets.shape[1], M * D))


@torch.library.custom_op("msda::fused_backward", mutates_args=())
def _fused_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    need_value_grad: bool = True,
    need_reference_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = (value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits)
    return _composed_gradients(grad_output, inputs, need_value_grad, need_reference_grad)


def _composed_gradients(grad_output, inputs, need_value_grad: bool, need_reference_grad: bool):
    """The composition's four gradients, contiguous, with an empty tensor for each one not needed
    (as the kernel returns them)."""
    value, reference_points = inputs[0], inputs[3]
    grads = _composed_backward(grad_output, *inputs, need_value_grad)
    grad_value, grad_ref, grad_offsets, grad_logits = (g.contiguous() for g in grads)
    return (
        grad_value if need_value_grad else value.new_empty(0),
        grad_ref if need_reference_grad else reference_points.new_empty(0),
        grad_offsets,
        grad_logits,
    )


@_fused_backward_op.register_kernel("cuda")
def _fused_backward_cuda(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    offsets,
    attention_logits,
    need_value_grad=True,
    need_reference_grad=True,
):
    inputs = (value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits)
    if not use_fused_kernel(value.device):
        return _composed_gradients(grad_output, inputs, need_value_grad, need_reference_grad)
    from ops.cuda import fused as cuda_fused

    if need_value_grad:
        check_deterministic("ms_deform_attn_fused's CUDA backward")
    grad_value, grad_offsets, grad_logits, grad_locations = cuda_fused.backward(
        grad_output.contiguous(), *inputs, need_grad_value=need_value_grad, need_grad_locations=need_reference_grad
    )
    if need_reference_grad:
        grad_ref = _reference_gradient(grad_locations, reference_points, offsets).contiguous()
    else:
        grad_ref = reference_points.new_empty(0)
    return grad_value, grad_ref, grad_offsets, grad_logits


@_fused_backward_op.register_fake
def _fused_backward_fake(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    offsets,
    attention_logits,
    need_value_grad=True,
    need_reference_grad=True,
):
    return (
        torch.empty_like(value) if need_value_grad else value.new_empty(0),
        torch.empty_like(reference_points) if need_reference_grad else reference_points.new_empty(0),
        torch.empty_like(offsets),
        torch.empty_like(attention_logits),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the raw inputs only: backward recomputes weights and locations


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_value, grad_ref, grad_offsets, grad_logits = _fused_backward_op(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        reference_points,
        offsets,
        attention_logits,
        needs[0],
        needs[3],
    )
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_ref if needs[3] else None,
        grad_offsets if needs[4] else None,
        grad_logits if needs[5] else None,
    )


_fused_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _validate_fused(value, spatial_shapes, reference_points, offsets, attention_logits) -> None:
    """Shape and dtype errors naming the fused op's own arguments; the level table and value are
    checked by the unfused op's validation."""
    for name, t in (
        ("reference_points", reference_points),
        ("offsets", offsets),
        ("attention_logits", attention_logits),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"value must have shape (N, S, M, D), got {shape}")
    if not isinstance(spatial_shapes, torch.Tensor) or spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        shape = tuple(spatial_shapes.shape) if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
        raise ValueError(f"spatial_shapes must have shape (L, 2) as (H, W), got {shape}")
    N, _, M, _ = value.shape
    L = spatial_shapes.shape[0]
    if offsets.dim() != 6 or (offsets.shape[0], offsets.shape[2], offsets.shape[3], offsets.shape[5]) != (N, M, L, 2):
        raise ValueError(
            f"offsets must have shape (N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2), got {tuple(offsets.shape)}"
        )
    Lq, P = offsets.shape[1], offsets.shape[4]
    if tuple(attention_logits.shape) != (N, Lq, M, L, P):
        raise ValueError(
            f"attention_logits must have shape (N, Lq, M, L, P) = {(N, Lq, M, L, P)}, got {tuple(attention_logits.shape)}"
        )
    if (
        reference_points.dim() != 4
        or tuple(reference_points.shape[:3]) != (N, Lq, L)
        or reference_points.shape[-1] not in (2, 4)
    ):
        raise ValueError(
            f"reference_points must have shape (N, Lq, L, 2) points or (N, Lq, L, 4) boxes = ({N}, {Lq}, {L}, 2|4), "
            f"got {tuple(reference_points.shape)}"
        )
    for name, t in (
        ("reference_points", reference_points),
        ("offsets", offsets),
        ("attention_logits", attention_logits),
    ):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}: all inputs must share a device")


def ms_deform_attn_fused(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention from the raw outputs of the ``sampling_offsets`` and
    ``attention_weights`` layers: equal to ``ms_deform_attn(value, ..., locations, softmax(logits))``
    with the locations of ``MSDeformAttn``, and differentiable for value, reference_points, offsets
    and attention_logits.

    Args:
        value: (N, S, M, D) float32, float16, bfloat16 or float64.
        spatial_shapes: (L, 2) int64 (H, W) of each level; S must equal sum(H*W).
        level_start_index: (L,) int64 start of each level in S.
        reference_points: (N, Lq, L, 2) normalized (x, y) points, or (N, Lq, L, 4) normalized
            (cx, cy, w, h) boxes.
        offsets: (N, Lq, M, L, P, 2) (x, y) offsets: in pixels of level l for points, in units of
            half the box size over P for boxes.
        attention_logits: (N, Lq, M, L, P) scores before the softmax over each head's L*P points.

    The last three are kept in float32 (float64 with float64 values), as the locations of the
    unfused op are.

    Returns:
        (N, Lq, M*D) in ``value``'s dtype.
    """
    _validate_fused(value, spatial_shapes, reference_points, offsets, attention_logits)
    # Value, level table and the shapes that match the unfused op's arguments one to one.
    validate(value, spatial_shapes, level_start_index, offsets, attention_logits)
    coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if not torch.compiler.is_compiling() and not (value.is_cuda and use_fused_kernel(value.device)):
        # No fused kernel here (the CPU, or a GPU without it): the composition under plain autograd,
        # so the unfused op takes its own best path (its CPU kernel, or the reference, whose backward
        # then reuses the forward's samples instead of recomputing them inside an opaque op). The
        # locations and softmax in coord_dtype, as on the fused path: not in a bf16 caller's dtype.
        return ms_deform_attn_composed(
            value,
            spatial_shapes,
            level_start_index,
            reference_points.to(coord_dtype),
            offsets.to(coord_dtype),
            attention_logits.to(coord_dtype),
        )
    return _fused_forward_op(
        value.contiguous(),
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        reference_points.to(coord_dtype).contiguous(),
        offsets.to(coord_dtype).contiguous(),
        attention_logits.to(coord_dtype).contiguous(),
    )
