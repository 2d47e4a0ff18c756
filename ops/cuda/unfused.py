"""Host side of the MSDeformAttn kernels: grid sizes, the ``Dims`` struct, the choice of instantiation.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

``forward`` and ``backward`` launch ``csrc/ms_deform_attn.cu`` through a kernel module (see
``ops.cuda.launch``): on a GPU the NVRTC build for the device's architecture (``ops.cuda.build``), loaded
once per device when the device is first probed and launched on torch's current stream; in tests
the g++ emulation of the same source (``ops.cuda.emulation``) on CPU tensors, through this same code.
Nothing happens at import time.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from pathlib import Path

import torch

from ops._checks import check_inputs
from ops.cuda.launch import KernelModule, launch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "ms_deform_attn.cu"
THREADS = 256  # MSDA_THREADS in ms_deform_attn.h: the kernels' __launch_bounds__
MAX_LEVELS = 4096  # MSDA_MAX_LEVELS: 3 ints per level fill the default 48 KiB of shared memory
_INT_MAX = 2**31 - 1

# The C++ type of each value dtype, as it appears in the kernels' name expressions.
TYPE_NAMES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
KERNEL_NAMES = tuple(
    f"msda::{direction}_kernel<{t}, {vec}>"
    for direction in ("forward", "backward")
    for t in TYPE_NAMES.values()
    for vec in ("true", "false")
)


class Dims(ctypes.Structure):
    """msda::Dims of ms_deform_attn.h, passed to both kernels by value (same field order and types)."""

    _fields_ = [
        ("n_groups", ctypes.c_longlong),
        ("S", ctypes.c_longlong),
        ("Lq", ctypes.c_longlong),
        ("M", ctypes.c_int),
        ("D", ctypes.c_int),
        ("L", ctypes.c_int),
        ("P", ctypes.c_int),
        ("row_stride", ctypes.c_int),
        ("log2_group", ctypes.c_int),
        ("n_chunks", ctypes.c_int),
        ("chunk_iters", ctypes.c_int),
    ]


def kernel_name(direction: str, dtype: torch.dtype, vectorized: bool) -> str:
    """``msda::forward_kernel<__nv_bfloat16, true>`` and the like."""
    return f"msda::{direction}_kernel<{TYPE_NAMES[dtype]}, {'true' if vectorized else 'false'}>"


def chunk_channels(dtype: torch.dtype) -> int:
    """CPT: channels per 16-byte chunk (4 float, 8 half/bfloat16, 2 double)."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def make_dims(N: int, S: int, M: int, D: int, Lq: int, L: int, P: int, cpt: int) -> Dims:
    """Dims for one launch, after checking the sizes the kernels index with 32-bit ints.

    Raises:
        ValueError: naming the size that does not fit.
    """
    for name, size in (("N", N), ("S", S), ("M", M), ("D", D), ("Lq", Lq), ("L", L), ("P", P)):
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
    if L > MAX_LEVELS:
        raise ValueError(f"the CUDA kernel handles at most {MAX_LEVELS} levels (shared memory), got L={L}")
    for name, size in (("S", S), ("M*D", M * D), ("L*P*2", L * P * 2)):
        if size > _INT_MAX:
            raise ValueError(f"the CUDA kernel indexes {name} with 32-bit ints: {name}={size} exceeds {_INT_MAX}")
    n_chunks = -(-D // cpt)
    log2_group = 0
    while (1 << log2_group) < n_chunks and log2_group < 5:
        log2_group += 1
    group = 1 << log2_group
    return Dims(
        n_groups=N * Lq * M,
        S=S,
        Lq=Lq,
        M=M,
        D=D,
        L=L,
        P=P,
        row_stride=M * D,
        log2_group=log2_group,
        n_chunks=n_chunks,
        chunk_iters=-(-n_chunks // group) if n_chunks > 0 else 1,
    )


def launch_geometry(dims: Dims) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """(grid, block, dynamic shared bytes): one thread per (group, lane), 3 ints per level staged."""
    blocks = -(-(dims.n_groups << dims.log2_group) // THREADS)
    if blocks > _INT_MAX:
        raise ValueError(f"N*Lq*M = {dims.n_groups} thread groups need {blocks} blocks, more than a grid holds")
    return (blocks, 1, 1), (THREADS, 1, 1), 3 * dims.L * 4


_unaligned_noted = False


def _aligned(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` if its data is 16-byte aligned, else an aligned copy: the vector kernels load 16 bytes at a
    time, and the scalar fallback costs 8x the loads (and atomics) in half precision."""
    global _unaligned_noted
    if t.numel() == 0 or t.data_ptr() % 16 == 0:
        return t
    if not _unaligned_noted:
        log.info("MSDeformAttn: %s is a view not 16-byte aligned; copying it once per call for 16-byte loads", name)
        _unaligned_noted = True
    return t.clone(memory_format=torch.contiguous_format)  # fresh allocations are aligned


def forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    module: KernelModule | None = None,
) -> torch.Tensor:
    """Run the forward kernel on value's device (torch's current stream there).

    Args:
        value: (N, S, M, D) float32/float16/bfloat16/float64, contiguous.
        spatial_shapes: (L, 2) int64 (H, W).
        level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, P, 2) float32 (float64 for float64 values).
        attention_weights: (N, Lq, M, L, P), same dtype as sampling_locations.
        module: the kernels to launch; default the NVRTC build for value's CUDA device. Tests pass
            an ``ops.cuda.emulation`` module and CPU tensors.

    Returns:
        (N, Lq, M*D) in value's dtype.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    cpt = chunk_channels(value.dtype)
    dims = make_dims(N, S, M, D, Lq, L, P, cpt)
    module = module or device_module(value.device)
    output = torch.empty((N, Lq, M * D), dtype=value.dtype, device=value.device)  # fully written
    if output.numel() == 0:
        return output
    vectorized = D % cpt == 0
    if vectorized:
        value = _aligned(value, "value")
    name = kernel_name("forward", value.dtype, vectorized)
    tensors = [value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output]
    launch(module, value.device, name, launch_geometry(dims), tensors, dims)
    return output


def backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    need_grad_value: bool = True,
    module: KernelModule | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``forward`` with respect to value, sampling_locations and attention_weights.

    Args:
        grad_output: (N, Lq, M*D) (or (N, Lq, M, D)) in value's dtype, contiguous.
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, module: as in forward.
        need_grad_value: False skips grad_value's zero fill, atomics and conversion (value needs no
            gradient); an empty tensor comes back in its place.

    Returns:
        grad_value (N, S, M, D) in value's dtype, grad_sampling_locations (N, Lq, M, L, P, 2) and
        grad_attention_weights (N, Lq, M, L, P) in the locations' dtype.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if grad_output.dtype != value.dtype or grad_output.device != value.device:
        raise TypeError(
            f"grad_output must be {value.dtype} on {value.device}, got {grad_output.dtype} on {grad_output.device}"
        )
    if grad_output.numel() != N * Lq * M * D or not grad_output.is_contiguous():
        raise ValueError(
            f"grad_output must be a contiguous (N, Lq, M*D) = ({N}, {Lq}, {M * D}) tensor, "
            f"got {tuple(grad_output.shape)}"
        )
    cpt = chunk_channels(value.dtype)
    dims = make_dims(N, S, M, D, Lq, L, P, cpt)
    module = module or device_module(value.device)
    # grad_value gathers atomic adds from every query, so it accumulates in float32 (float64 for
    # float64) whatever value's dtype, and must start at zero.
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device) if need_grad_value else None
    grad_loc = torch.empty_like(sampling_locations)  # written once per element by the kernel
    grad_attn = torch.empty_like(attention_weights)
    if grad_loc.numel() > 0:
        vectorized = D % cpt == 0
        if vectorized:
            grad_output = _aligned(grad_output, "grad_output")
            value = _aligned(value, "value")
        name = kernel_name("backward", value.dtype, vectorized)
        tensors = [grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights]
        launch(module, value.device, name, launch_geometry(dims), [*tensors, grad_value, grad_loc, grad_attn], dims)
    if grad_value is None:
        return value.new_empty(0), grad_loc, grad_attn
    return grad_value.to(value.dtype), grad_loc, grad_attn


# ---------------------------------------------------------------------------------------------
# Devices: one NVRTC build per architecture, one loaded module per device
# ---------------------------------------------------------------------------------------------


def arch_for_capability(capability: tuple[int, int]) -> str:
    """``sm_XY`` for a compute capability (X, Y), e.g. (9, 0) -> "sm_90"."""
    major, minor = capability
    if major < 1 or not 0 <= minor <= 9:
        raise ValueError(f"capability must be (major >= 1, minor in 0..9), got {tuple(capability)}")
    return f"sm_{major}{minor}"


def normalize_arch(arch: str) -> str:
    """Accept "sm_90", "90", "9.0" or "sm_90a"; return "sm_90" / "sm_90a"."""
    text = str(arch).strip().lower()
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?([af]?)", text)
    if match is None:
        raise ValueError(f"arch must look like 'sm_90', '90' or '9.0', got {arch!r}")
    major, minor, suffix = match.groups()
    digits = major + (minor or "")
    if len(digits) < 2:
        raise ValueError(f"arch must name major and minor version, got {arch!r}")
    return f"sm_{digits}{suffix}"


def device_index(device: torch.device | str | int | None) -> int | None:
    """The CUDA device index ``device`` names ("cuda" or None: the current device); None without CUDA."""
    if isinstance(device, int):
        return device
    if device is not None and torch.device(device).index is not None:
        return torch.device(device).index
    return torch.cuda.current_device() if torch.cuda.is_available() else None


class GpuKernels:
    """One CUDA source's kernels: compiled by NVRTC once per architecture, loaded once per device.

    Args:
        source: the ``.cu`` file.
        names: the name expressions of every kernel it instantiates.
        what: what the kernels are, for messages ("the MSDeformAttn CUDA kernel").
    """

    def __init__(self, source: Path, names: tuple[str, ...], what: str) -> None:
        self.source, self.names, self.what = source, names, what
        self._lock = threading.Lock()
        self.modules: dict[int, KernelModule] = {}  # CUDA device index -> loaded module
        self.availability: dict[int | None, tuple[bool, str]] = {}

    def build(self, arch: str) -> Path:
        """Compile the kernels for ``arch`` into the cache (no GPU needed); return the cache file."""
        from ops.cuda import build as nvrtc

        return nvrtc.build(self.source, self.names, normalize_arch(arch))

    def is_available(self, device: torch.device | str | int | None = None) -> tuple[bool, str]:
        """(True, "") when the kernels can run on ``device`` (default: the current CUDA device), else
        (False, why). Cached per device index. The first call for a device compiles (or finds in the
        cache) and loads every kernel there, so no kernel loads later, e.g. inside a CUDA-graph capture.
        """
        index = device_index(device)
        answer = self.availability.get(index)
        if answer is None:
            with self._lock:
                answer = self.availability.get(index)
                if answer is None:
                    answer = self._probe(index)
                    # A failure inside a CUDA-graph capture may be the capture's doing: probe again later.
                    if answer[0] or not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                        self.availability[index] = answer
        return answer

    def device_module(self, device: torch.device | str | int | None) -> KernelModule:
        """The kernels loaded on ``device``, compiled and loaded on first use.

        Raises:
            RuntimeError: they cannot run there (the message says why).
        """
        index = device_index(device)
        ok, reason = self.is_available(index)
        if not ok:
            raise RuntimeError(f"{self.what} is unavailable on cuda:{index}: {reason}")
        return self.modules[index]

    def _probe(self, index: int | None) -> tuple[bool, str]:
        if index is None or not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        try:
            from ops.cuda import build as nvrtc
        except ImportError as exc:
            return False, (
                f"NVIDIA's runtime compiler is not installed ({exc}); install it with pip install 'msda-ops[cuda]' "
                "(cuda-bindings, nvidia-cuda-nvrtc, nvidia-cuda-runtime)"
            )
        arch = "?"
        try:
            arch = arch_for_capability(torch.cuda.get_device_capability(index))
            self.modules[index] = nvrtc.GpuModule(nvrtc.build(self.source, self.names, arch), index)
        except Exception as exc:  # any compile or load failure means "use the fallback", loudly
            return False, f"compiling or loading {self.what} for {arch} on cuda:{index} failed: {exc}"
        return True, ""


KERNELS = GpuKernels(SOURCE, KERNEL_NAMES, "the MSDeformAttn CUDA kernel")
build, is_available, device_module = KERNELS.build, KERNELS.is_available, KERNELS.device_module
