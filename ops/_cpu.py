"""Build (with the machine's C++ compiler, cached), load (with ctypes) and call the CPU kernel in ``ops/csrc``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Like the CUDA kernel (``ops/_cuda.py``): no torch C++ extension machinery. ``c++ -shared`` builds
``libmsda_cpu.so`` once per (sources, compiler, flags, machine architecture) under ``$MSDA_CACHE_DIR``
(default ``~/.cache/msda_ops``), ctypes loads it, and tensors cross as raw pointers. The compiler is
``$CXX`` when set, else ``c++``, ``g++`` or ``clang++`` on PATH. The library is built for the
architecture's baseline (no ``-march=native``: the cache may be shared by different CPUs); on x86-64
with GCC the kernel carries an AVX2/FMA copy that the loader picks on CPUs that have it. Nothing
happens at import time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from ops import _cache
from ops._checks import check_inputs

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "ms_deform_attn_cpu.cpp"
HEADERS = (CSRC / "bilinear.h",)
# Must equal MSDA_CPU_ABI_VERSION in ms_deform_attn_cpu.cpp: a cached library with other signatures is rejected.
ABI_VERSION = 1
# Part of the cache key, so changing them rebuilds.
CXX_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-pthread")

# dtype code of the C interface for each value dtype the kernel stores natively; float16 values
# are computed in float32 (see forward).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float64: 3}
_CPU = torch.device("cpu")
_ERRORS = {1: "sizes the kernel cannot index, or an unknown dtype", 2: "out of memory for scratch buffers"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_availability: tuple[bool, str] | None = None


def find_compiler() -> tuple[str | None, str]:
    """(path, "") of the C++ compiler to use, or (None, why not): $CXX when set, else c++/g++/clang++ on PATH."""
    wanted = os.environ.get("CXX", "").strip()
    if wanted:
        path = shutil.which(wanted)
        if path is None:
            return None, f"C++ compiler $CXX={wanted!r} not found"
        return path, ""
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path is not None:
            return path, ""
    return None, "no C++ compiler found ($CXX unset; no c++, g++ or clang++ on PATH)"


def compiler_version(cxx: str) -> str:
    """``cxx --version`` output (the whole text: it names the exact build)."""
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cxx} --version failed with exit code {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def cache_key(cxx: str, version_text: str) -> str:
    """The cache entry of the library: sources, compiler, flags and machine architecture."""
    return "cpu-" + _cache.content_key(
        (
            SOURCE.read_bytes(),
            *(h.read_bytes() for h in HEADERS),
            cxx,
            version_text,
            "\0".join(CXX_FLAGS),
            platform.machine(),
        )
    )


def build(cxx: str | None = None) -> Path:
    """Compile ``ms_deform_attn_cpu.cpp`` into the kernel cache if it is not there yet; return the library path.

    The cache (``ops._cache``, shared with the CUDA kernels) builds once under concurrent builders and
    rebuilds a corrupt entry.

    Args:
        cxx: compiler path; defaults to ``find_compiler()``.

    Raises:
        RuntimeError: no compiler, or the compiler fails (the message holds its stderr).
    """
    if cxx is None:
        cxx, reason = find_compiler()
        if cxx is None:
            raise RuntimeError(reason)

    def produce(tmp: Path) -> None:
        cmd = [cxx, *CXX_FLAGS, "-o", str(tmp), str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{cxx} failed (exit code {proc.returncode}) building {SOURCE.name}\n"
                f"command: {' '.join(cmd)}\n{(proc.stderr or proc.stdout).strip()}"
            )
        os.chmod(tmp, 0o755)

    return _cache.cached(cache_key(cxx, compiler_version(cxx)), "libmsda_cpu.so", produce)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of ms_deform_attn_cpu.cpp on a loaded library and check its ABI version."""
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.msda_cpu_abi_version.argtypes = []
    lib.msda_cpu_abi_version.restype = i32
    version = lib.msda_cpu_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(f"libmsda_cpu ABI version is {version}, ops/_cpu.py expects {ABI_VERSION}")
    sizes = [i64] * 7  # N, S, M, D, Lq, L, P
    # dtype, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output
    lib.msda_cpu_forward.argtypes = [i32, *[ptr] * 6, *sizes, i32]
    lib.msda_cpu_forward.restype = i32
    # dtype, grad_output, value, spatial_shapes, level_start_index, sampling_locations,
    # attention_weights, grad_value, grad_sampling_locations, grad_attention_weights
    lib.msda_cpu_backward.argtypes = [i32, *[ptr] * 9, *sizes, i32]
    lib.msda_cpu_backward.restype = i32
    return lib


def load() -> ctypes.CDLL:
    """The built and bound library, built on the first call."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = bind(ctypes.CDLL(str(build())))
    return _lib


def is_available() -> tuple[bool, str]:
    """(True, "") when the CPU kernel is built (building it on the first call) and loads, else (False, why).

    The answer is kept for the process.
    """
    global _availability
    if _availability is None:
        try:
            load()
            _availability = (True, "")
        except Exception as exc:  # any build or load failure means "use the reference path"
            _availability = (False, f"building or loading the CPU kernel failed: {exc}")
    return _availability


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
