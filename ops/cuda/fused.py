"""Host side of the fused kernel (``csrc/ms_deform_attn_fused.cu``): the ``FusedDims`` struct, the launch
shape per case, the choice of instantiation, and the launches through a kernel module.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level), G lanes per (n, q, m), R = 2 (points) or 4 (boxes).

Launched like the unfused kernel (``ops.cuda.unfused``): on a GPU the NVRTC build of the source for the
device's architecture, loaded when the device is first probed; in tests the g++ emulation of the
same source (``ops.cuda.emulation``) on CPU tensors, through this same code. Nothing happens at import.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ops._checks import ALL_DTYPES, check_tensors, coord_dtype
from ops.cuda.launch import launch
from ops.cuda.unfused import TYPE_NAMES, GpuKernels, chunk_channels

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "ms_deform_attn_fused.cu"
MAX_THREADS = 256  # kThreads in the source: the kernels' __launch_bounds__
SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without opting in
MAX_TILE = {"forward": 16, "backward": 8}  # points per shared-memory tile
# Backward: sum grad_value adds that collide within a warp before the atomic (FusedDims.aggregate).
# Module-level so the benchmark can time both; whether it pays is for the GPU to say.
AGGREGATE_ATOMICS = True
_INT_MAX = 2**31 - 1

KERNEL_NAMES = tuple(
    f"msda_fused::{direction}_kernel<{t}, {vec}>"
    for direction in ("forward", "backward")
    for t in TYPE_NAMES.values()
    for vec in ("true", "false")
)


class FusedDims(ctypes.Structure):
    """msda_fused::FusedDims of the source, passed to both kernels by value (same fields, same order)."""

    _fields_ = [
        ("n_groups", ctypes.c_longlong),
        ("S", ctypes.c_longlong),
        ("Lq", ctypes.c_longlong),
        ("half_over_p", ctypes.c_double),
        ("M", ctypes.c_int),
        ("D", ctypes.c_int),
        ("L", ctypes.c_int),
        ("P", ctypes.c_int),
        ("row_bytes", ctypes.c_int),
        ("log2_group", ctypes.c_int),
        ("n_chunks", ctypes.c_int),
        ("chunk_iters", ctypes.c_int),
        ("tile", ctypes.c_int),
        ("box", ctypes.c_int),
        ("p_magic", ctypes.c_uint),
        ("aggregate", ctypes.c_int),
    ]


def kernel_name(direction: str, dtype: torch.dtype, vectorized: bool) -> str:
    """``msda_fused::forward_kernel<__nv_bfloat16, true>`` and the like."""
    return f"msda_fused::{direction}_kernel<{TYPE_NAMES[dtype]}, {'true' if vectorized else 'false'}>"


def _point_bytes(direction: str, dtype: torch.dtype, group: int) -> int:
    """Shared bytes per point of a tile, per group: the record every lane reads (4 weights, 4 rows),
    and in the backward the owner's record (a, lh, lw, valid) and the G lanes' 4 partial dots."""
    acc = 8 if dtype == torch.float64 else 4
    record = 4 * acc + 16
    if direction == "forward":
        return record
    owner = 32 if acc == 8 else 16
    return record + owner + group * 4 * acc


def launch_shape(direction: str, dtype: torch.dtype, dims: FusedDims) -> tuple[int, int, int]:
    """(threads per block, points per tile, dynamic shared bytes) for one launch.

    Blocks shrink from 256 threads to 128 or 64 when the problem is small (the decoder's 300 queries
    give 150 blocks of 256 threads: about one per SM of an H100); the backward starts at 128 threads
    because its tiles hold G partial dots per point. The tile is as many points as fit 48 KiB.
    """
    group = 1 << dims.log2_group
    lanes = dims.n_groups * group
    threads = 128 if direction == "backward" else MAX_THREADS
    while threads > 64 and -(-lanes // threads) < 4 * 132:  # 4 blocks per SM of a 132-SM GPU
        threads //= 2
    threads = max(threads, group, 32)
    levels = -(-3 * dims.L * 4 // 16) * 16
    per_point = (threads // group) * _point_bytes(direction, dtype, group)
    tile = max(1, min(MAX_TILE[direction], dims.L * dims.P, (SHARED_LIMIT - levels) // per_point))
    return threads, tile, levels + tile * per_point


def make_dims(N: int, S: int, M: int, D: int, Lq: int, L: int, P: int, dtype: torch.dtype, box: bool) -> FusedDims:
    """FusedDims for one launch (tile filled in by ``launch_geometry``), after checking the sizes the
    kernels index with 32-bit ints.

    Raises:
        ValueError: naming the size that does not fit.
    """
    for name, size in (("N", N), ("S", S), ("M", M), ("D", D), ("Lq", Lq), ("L", L), ("P", P)):
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
    acc = 8 if dtype == torch.float64 else 4
    # Rows are 32-bit positions in S; a row's bytes (value or the float32/64 grad_value) fit an int.
    for name, size in (("S", S), (f"M*D*{acc} (bytes of a grad_value row)", M * D * acc), ("L*P*2", L * P * 2)):
        if size > _INT_MAX:
            raise ValueError(f"the fused kernel indexes {name} with 32-bit ints: {name}={size} exceeds {_INT_MAX}")
    if L * P > 65535:  # the level of point i is i * p_magic >> 32, exact while i * P < 2**32
        raise ValueError(f"the fused kernel handles at most 65535 points per head (L*P), got L*P={L * P}")
    if L * 12 + 16 > SHARED_LIMIT // 2:
        raise ValueError(f"the fused kernel stages the level table in shared memory: L={L} levels is too many")
    cpt = chunk_channels(dtype)
    n_chunks = -(-D // cpt)
    log2_group = 0
    while (1 << log2_group) < n_chunks and log2_group < 5:
        log2_group += 1
    group = 1 << log2_group
    return FusedDims(
        n_groups=N * Lq * M,
        S=S,
        Lq=Lq,
        half_over_p=0.5 / P if P > 0 else 0.0,
        M=M,
        D=D,
        L=L,
        P=P,
        row_bytes=M * D * torch.empty((), dtype=dtype).element_size(),
        log2_group=log2_group,
        n_chunks=n_chunks,
        chunk_iters=-(-n_chunks // group) if n_chunks > 0 else 1,
        tile=1,
        box=int(box),
        p_magic=2**32 // P + 1 if P > 1 else 0,
        aggregate=int(AGGREGATE_ATOMICS),
    )


def launch_geometry(direction: str, dtype: torch.dtype, dims: FusedDims) -> tuple[tuple, tuple, int]:
    """(grid, block, dynamic shared bytes); sets ``dims.tile``."""
    threads, dims.tile, shared = launch_shape(direction, dtype, dims)
    blocks = -(-(dims.n_groups << dims.log2_group) // threads)
    if blocks > _INT_MAX:
        raise ValueError(f"N*Lq*M = {dims.n_groups} thread groups need {blocks} blocks, more than a grid holds")
    return (blocks, 1, 1), (threads, 1, 1), shared


def _check_inputs(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits) -> None:
    """The cheap checks that keep a wrong tensor from reaching the kernel as a raw pointer."""
    coord = coord_dtype(value)
    check_tensors(
        value,
        ALL_DTYPES,
        value.device,
        spatial_shapes=(spatial_shapes, torch.int64),
        level_start_index=(level_start_index, torch.int64),
        reference_points=(reference_points, coord),
        offsets=(offsets, coord),
        attention_logits=(attention_logits, coord),
    )
    N, _, M, _ = value.shape
    L = spatial_shapes.shape[0]
    if offsets.dim() != 6 or (offsets.shape[0], offsets.shape[2], offsets.shape[3], offsets.shape[5]) != (N, M, L, 2):
        raise ValueError(
            f"offsets must have shape (N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2), got {tuple(offsets.shape)}"
        )
    Lq = offsets.shape[1]
    if tuple(attention_logits.shape) != tuple(offsets.shape[:-1]):
        raise ValueError(
            f"attention_logits must have shape {tuple(offsets.shape[:-1])}, got {tuple(attention_logits.shape)}"
        )
    if (
        reference_points.dim() != 4
        or tuple(reference_points.shape[:3]) != (N, Lq, L)
        or reference_points.shape[3] not in (2, 4)
    ):
        raise ValueError(f"reference_points must have shape ({N}, {Lq}, {L}, 2|4), got {tuple(reference_points.shape)}")


def _vectorized(dtype: torch.dtype, D: int, *tensors: torch.Tensor) -> bool:
    """The 16-byte-load instantiation: D a multiple of CPT and every value-shaped base 16-byte aligned."""
    return D % chunk_channels(dtype) == 0 and all(
        t is None or t.numel() == 0 or t.data_ptr() % 16 == 0 for t in tensors
    )


def forward(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits, module=None):
    """Run the fused forward kernel on value's device.

    Args:
        value: (N, S, M, D) float32/float16/bfloat16/float64, contiguous.
        spatial_shapes, level_start_index: (L, 2) and (L,) int64.
        reference_points: (N, Lq, L, 2|4); offsets: (N, Lq, M, L, P, 2); attention_logits:
            (N, Lq, M, L, P); float32 (float64 for float64 values), contiguous.
        module: the kernels to launch; default the NVRTC build for value's CUDA device. Tests pass an
            ``ops.cuda.emulation`` module and CPU tensors.

    Returns:
        (N, Lq, M*D) in value's dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = offsets.shape
    dims = make_dims(N, S, M, D, Lq, L, P, value.dtype, reference_points.shape[-1] == 4)
    module = module or device_module(value.device)
    output = torch.empty((N, Lq, M * D), dtype=value.dtype, device=value.device)  # fully written
    if output.numel() == 0:
        return output
    name = kernel_name("forward", value.dtype, _vectorized(value.dtype, D, value, output))
    tensors = [value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits, output]
    launch(module, value.device, name, launch_geometry("forward", value.dtype, dims), tensors, dims)
    return output


def backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    reference_points,
    offsets,
    attention_logits,
    need_grad_value: bool = True,
    need_grad_locations: bool = False,
    module=None,
):
    """Gradients of ``forward`` for value, offsets and attention_logits, and d loss / d location.

    Args:
        grad_output: (N, Lq, M*D) in value's dtype, contiguous.
        need_grad_value: False skips grad_value's zero fill, atomics and conversion.
        need_grad_locations: True also returns d loss / d normalized location (N, Lq, M, L, P, 2),
            from which the caller sums the reference points' gradient.
        Others as in ``forward``.

    Returns:
        grad_value (N, S, M, D) in value's dtype (empty unless needed), grad_offsets (N, Lq, M, L, P, 2),
        grad_logits (N, Lq, M, L, P), grad_locations (N, Lq, M, L, P, 2) (empty unless needed).
    """
    _check_inputs(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = offsets.shape
    if grad_output.dtype != value.dtype or grad_output.numel() != N * Lq * M * D or not grad_output.is_contiguous():
        raise ValueError(
            f"grad_output must be a contiguous {value.dtype} (N, Lq, M*D) = ({N}, {Lq}, {M * D}) tensor, "
            f"got {grad_output.dtype} {tuple(grad_output.shape)}"
        )
    dims = make_dims(N, S, M, D, Lq, L, P, value.dtype, reference_points.shape[-1] == 4)
    module = module or device_module(value.device)
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    # grad_value gathers atomic adds from every query: float32 (float64) and zeroed, whatever value's dtype.
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device) if need_grad_value else None
    grad_offsets = torch.empty_like(offsets)  # written once per element
    grad_logits = torch.empty_like(attention_logits)
    grad_locations = torch.empty_like(offsets) if need_grad_locations else None
    if grad_offsets.numel() > 0:
        vectorized = _vectorized(value.dtype, D, grad_output, value, grad_value)
        name = kernel_name("backward", value.dtype, vectorized)
        tensors = [grad_output, value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits]
        tensors += [grad_value, grad_offsets, grad_logits, grad_locations]
        launch(module, value.device, name, launch_geometry("backward", value.dtype, dims), tensors, dims)
    empty = value.new_empty(0)
    return (
        empty if grad_value is None else grad_value.to(value.dtype),
        grad_offsets,
        grad_logits,
        empty if grad_locations is None else grad_locations,
    )


# ---------------------------------------------------------------------------------------------
# Devices: one NVRTC build per architecture, one loaded module per device
# ---------------------------------------------------------------------------------------------


KERNELS = GpuKernels(SOURCE, KERNEL_NAMES, "the fused MSDeformAttn kernel")
build, is_available, device_module = KERNELS.build, KERNELS.is_available, KERNELS.device_module
