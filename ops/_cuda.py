"""Build (with nvcc, cached), load (with ctypes) and call the plain-CUDA kernel in ``ops/csrc``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

No torch C++ extension machinery: ``nvcc --shared`` builds ``libmsda.so`` once per (source,
architecture, nvcc) under ``$MSDA_CACHE_DIR`` (default ``~/.cache/msda_ops``), ctypes loads it, and
tensors cross as raw pointers on torch's current stream. The architecture is that of the device the
tensors live on, so a machine mixing GPU kinds loads one library per kind. Nothing happens at import time.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "ms_deform_attn.cu"
HEADER = CSRC / "ms_deform_attn.h"
# Must equal MSDA_ABI_VERSION in ms_deform_attn.h: a cached library with other signatures is rejected.
ABI_VERSION = 1
# Part of the cache key, so changing them rebuilds. -std=c++17 for `if constexpr` on nvcc 11.x.
NVCC_FLAGS = ("-O3", "--shared", "-std=c++17", "-Xcompiler", "-fPIC")

# dtype code of the C interface (enum MsdaDtype) for each value dtype.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_lock = threading.Lock()
# Loaded libraries by architecture ("sm_90"), and is_available() answers by CUDA device index.
_libs: dict[str, ctypes.CDLL] = {}
_device_arch: dict[int | None, str] = {}  # CUDA device index -> "sm_90"
_availability: dict[int | None, tuple[bool, str]] = {}


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc when it exists, else the nvcc on PATH, else None."""
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home:
        candidate = Path(cuda_home) / "bin" / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("nvcc")


def cache_root() -> Path:
    """Where built libraries live: $MSDA_CACHE_DIR, default ~/.cache/msda_ops."""
    return Path(os.environ.get("MSDA_CACHE_DIR") or Path.home() / ".cache" / "msda_ops")


def arch_for_capability(capability: tuple[int, int]) -> str:
    """``sm_XY`` for a compute capability (X, Y), e.g. (9, 0) -> "sm_90"."""
    major, minor = capability
    if major < 1 or not 0 <= minor <= 9:
        raise ValueError(f"capability must be (major >= 1, minor in 0..9), got {tuple(capability)}")
    return f"sm_{major}{minor}"


def default_arch(device: torch.device | int | None = None) -> str:
    """``sm_XY`` of ``device`` (a CUDA device or index; None: the current CUDA device)."""
    return arch_for_capability(torch.cuda.get_device_capability(device))


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


def gencode_flags(arch: str) -> list[str]:
    """SASS for ``arch`` plus its PTX, so a newer GPU than the one built for can still JIT it."""
    number = normalize_arch(arch)[len("sm_") :]
    return ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]


def nvcc_version(nvcc: str) -> str:
    """``nvcc --version`` output (the whole text: it names the exact build)."""
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{nvcc} --version failed with exit code {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def cache_key(arch: str, nvcc_version_text: str) -> str:
    """sha256 over everything that changes the built library: sources, arch, compiler, flags."""
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        HEADER.read_bytes(),
        normalize_arch(arch).encode(),
        nvcc_version_text.encode(),
        "\0".join(NVCC_FLAGS + tuple(gencode_flags(arch))).encode(),
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def build(arch: str | None = None, nvcc: str | None = None) -> Path:
    """Compile ``ms_deform_attn.cu`` into the cache if it is not there yet; return the library path.

    Safe with several processes building at once: the first takes an flock on the cache entry and
    builds into a temporary file that is renamed into place; the others wait on the lock and then
    find the finished library.

    Args:
        arch: target like "sm_90"; defaults to the current CUDA device's compute capability.
        nvcc: compiler path; defaults to ``find_nvcc()``.

    Raises:
        RuntimeError: nvcc is missing or fails (the message holds nvcc's stderr).
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: looked at $CUDA_HOME/bin/nvcc and on PATH")
    arch = normalize_arch(arch or default_arch())
    entry = cache_root() / cache_key(arch, nvcc_version(nvcc))
    library = entry / "libmsda.so"
    if library.is_file():
        return library
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if library.is_file():  # built by another process while this one waited
            return library
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".libmsda-", suffix=".so")
        os.close(fd)
        try:
            cmd = [nvcc, *NVCC_FLAGS, *gencode_flags(arch), "-o", tmp, str(SOURCE)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"nvcc failed (exit code {proc.returncode}) building {SOURCE.name} for {arch}\n"
                    f"command: {' '.join(cmd)}\n{(proc.stderr or proc.stdout).strip()}"
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, library)  # atomic: readers see no library or a whole one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return library


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of ms_deform_attn.h on a loaded library and check its ABI version."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.msda_abi_version.argtypes = []
    lib.msda_abi_version.restype = ctypes.c_int
    version = lib.msda_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(f"libmsda ABI version is {version}, ops/_cuda.py expects {ABI_VERSION}")
    sizes = [i64] * 7  # N, S, M, D, Lq, L, P
    # dtype, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output
    lib.msda_forward.argtypes = [ctypes.c_int, *[ptr] * 6, *sizes, ptr]
    lib.msda_forward.restype = ctypes.c_int
    # dtype, grad_output, value, spatial_shapes, level_start_index, sampling_locations,
    # attention_weights, grad_value, grad_sampling_locations, grad_attention_weights
    lib.msda_backward.argtypes = [ctypes.c_int, *[ptr] * 9, *sizes, ptr]
    lib.msda_backward.restype = ctypes.c_int
    lib.msda_check_device.argtypes = []
    lib.msda_check_device.restype = ctypes.c_int
    lib.msda_error_string.argtypes = [ctypes.c_int]
    lib.msda_error_string.restype = ctypes.c_char_p
    return lib


def load(arch: str | None = None, device: torch.device | int | None = None) -> ctypes.CDLL:
    """The built and bound library for ``arch`` (default: ``device``'s architecture, or the current
    device's), built on the first call for that architecture and kept per architecture."""
    if arch:
        arch = normalize_arch(arch)
    else:
        # Every forward and backward comes here: ask a device for its capability once, not per call.
        index = device_index(device)
        arch = _device_arch.get(index)
        if arch is None:
            arch = _device_arch[index] = default_arch(index)
    lib = _libs.get(arch)
    if lib is None:
        with _lock:
            lib = _libs.get(arch)
            if lib is None:
                lib = _libs[arch] = bind(ctypes.CDLL(str(build(arch))))
    return lib


def device_index(device: torch.device | str | int | None) -> int | None:
    """The CUDA device index ``device`` names ("cuda" or None: the current device); None without CUDA."""
    if isinstance(device, int):
        return device
    if device is not None and torch.device(device).index is not None:
        return torch.device(device).index
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def is_available(device: torch.device | str | int | None = None) -> tuple[bool, str]:
    """(True, "") when the kernel can run on ``device`` (default: the current CUDA device), else
    (False, why). Cached per device index.

    Builds the library for the device's architecture on the first call when there is a device and an nvcc.
    """
    index = device_index(device)
    answer = _availability.get(index)
    if answer is None:
        answer = _availability[index] = _probe(index)
    return answer


def _probe(index: int | None) -> tuple[bool, str]:
    if index is None or not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if find_nvcc() is None:
        return False, "CUDA compiler nvcc not found (looked at $CUDA_HOME/bin/nvcc and on PATH)"
    try:
        lib = load(device=index)
        with torch.cuda.device(index):  # msda_check_device asks about the current device
            code = lib.msda_check_device()
        if code != 0:
            return False, f"the CUDA kernel cannot run on this device: {_error_string(lib, code)}"
    except Exception as exc:  # any build or load failure means "use the reference path"
        return False, f"building or loading the CUDA kernel failed: {exc}"
    return True, ""


def _error_string(lib: ctypes.CDLL, code: int) -> str:
    return f"{lib.msda_error_string(code).decode()} (cudaError {code})"


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: {_error_string(lib, code)}")


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """The cheap checks that keep a wrong tensor from reaching the kernel as a raw pointer."""
    coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    expected = {
        "value": (value, value.dtype),
        "spatial_shapes": (spatial_shapes, torch.int64),
        "level_start_index": (level_start_index, torch.int64),
        "sampling_locations": (sampling_locations, coord_dtype),
        "attention_weights": (attention_weights, coord_dtype),
    }
    if value.dtype not in DTYPE_CODES:
        raise TypeError(f"value must be float32, float16, bfloat16 or float64, got {value.dtype}")
    for name, (t, dtype) in expected.items():
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype} for {value.dtype} values, got {t.dtype}")
        if t.device != value.device or not t.is_cuda:
            raise ValueError(f"{name} must be on value's CUDA device {value.device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
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


def forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Run the forward kernel on value's device and torch's current stream there.

    Args:
        value: (N, S, M, D) float32/float16/bfloat16/float64, contiguous, CUDA.
        spatial_shapes: (L, 2) int64 (H, W).
        level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, P, 2) float32 (float64 for float64 values).
        attention_weights: (N, Lq, M, L, P), same dtype as sampling_locations.

    Returns:
        (N, Lq, M*D) in value's dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    lib = load(device=value.device)
    with torch.cuda.device(value.device):
        output = torch.empty((N, Lq, M * D), dtype=value.dtype, device=value.device)  # fully written
        code = lib.msda_forward(
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
            torch.cuda.current_stream(value.device).cuda_stream,
        )
    _check(lib, code, "msda_forward")
    return output


def backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``forward`` with respect to value, sampling_locations and attention_weights.

    Args:
        grad_output: (N, Lq, M*D) (or (N, Lq, M, D)) in value's dtype, contiguous.
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as in forward.

    Returns:
        grad_value (N, S, M, D) in value's dtype, grad_sampling_locations (N, Lq, M, L, P, 2) and
        grad_attention_weights (N, Lq, M, L, P) in the locations' dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
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
    # grad_value gathers atomic adds from every query, so it accumulates in float32 (float64 for
    # float64) whatever value's dtype, and must start at zero.
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    lib = load(device=value.device)
    with torch.cuda.device(value.device):
        grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
        grad_loc = torch.empty_like(sampling_locations)  # written once per element by the kernel
        grad_attn = torch.empty_like(attention_weights)
        code = lib.msda_backward(
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
            torch.cuda.current_stream(value.device).cuda_stream,
        )
        _check(lib, code, "msda_backward")
        grad_value = grad_value.to(value.dtype)
    return grad_value, grad_loc, grad_attn
