"""Which path the op takes on a device: the CUDA kernels, the CPU kernel or the PyTorch reference.

The setting comes from ``set_backend`` or ``$MSDA_BACKEND``; each ``use_*`` answers for one device and
kernel, building the kernel on first use, and says once (loudly on a GPU) when it falls back.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "cpu", "reference")
_backend_override: str | None = None
_fallback_logged = False
_cpu_fallback_logged = False
_fused_fallback_logged = False


def set_backend(name: str | None) -> None:
    """Force a backend for this process: "cuda", "cpu", "reference", "auto", or None to follow $MSDA_BACKEND.

    "cuda" and "cpu" force the kernel of that device (an error where it cannot be built); tensors on
    the other device still take their own default.
    """
    global _backend_override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend_override = name


def get_backend() -> str:
    """The backend setting in force: set_backend() first, then $MSDA_BACKEND, then "auto"."""
    if _backend_override is not None:
        return _backend_override
    name = os.environ.get("MSDA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MSDA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def use_cuda_kernel(device: torch.device) -> bool:
    """Decide, for CUDA tensors on ``device``, between the kernel and the reference path.

    A fall back to the reference is loud (a warning, once per process, naming the cause and the
    fix): it is many times slower, and a training job that silently takes it wastes its GPUs.
    MSDA_BACKEND=cuda makes it an error.
    """
    global _fallback_logged
    backend = get_backend()
    if backend == "reference":
        return False
    from ops.cuda import unfused as cuda_unfused

    ok, reason = cuda_unfused.is_available(device)
    if ok:
        return True
    fix = (
        "Fix: pip install 'msda-ops[cuda]' (NVIDIA's runtime compiler, no nvcc needed) and check "
        "`python -m ops info`; MSDA_BACKEND=reference selects the reference path on purpose."
    )
    if backend == "cuda":
        raise RuntimeError(
            f"MSDA_BACKEND=cuda but the MSDeformAttn CUDA kernel is unavailable on {device}: {reason}. {fix}"
        )
    if not _fallback_logged:
        message = (
            f"MSDeformAttn falls back to the PyTorch reference on {device}, many times slower than the CUDA "
            f"kernel, which is unavailable: {reason}. {fix} MSDA_BACKEND=cuda turns this warning into an error."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning("%s", message)
        _fallback_logged = True
    return False


def use_cpu_kernel() -> bool:
    """Decide, for CPU tensors, between the CPU kernel and the reference path."""
    global _cpu_fallback_logged
    backend = get_backend()
    if backend == "reference":
        return False
    from ops.cpu import build as cpu_build

    ok, reason = cpu_build.is_available()
    if ok:
        return True
    if backend == "cpu":
        raise RuntimeError(f"MSDA backend 'cpu' was forced but the CPU kernel is unavailable: {reason}")
    if not _cpu_fallback_logged:
        log.warning("MSDeformAttn CPU kernel unavailable (%s); using the PyTorch reference path", reason)
        _cpu_fallback_logged = True
    return False


def use_kernel(device: torch.device) -> bool:
    """Whether tensors on ``device`` run a kernel (else the reference path)."""
    if device.type == "cpu":
        return use_cpu_kernel()
    if device.type == "cuda":
        return use_cuda_kernel(device)
    return False


def check_deterministic(what: str) -> None:
    """Raise (or warn, with warn_only=True) as PyTorch's own nondeterministic CUDA ops do."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{what} does not have a deterministic implementation (grad_value is summed with float atomics), but "
        "you set 'torch.use_deterministic_algorithms(True)'. Turn that off for this op with "
        "torch.use_deterministic_algorithms(True, warn_only=True), or detach value if it needs no gradient."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def use_fused_kernel(device: torch.device) -> bool:
    """On CUDA tensors: the fused kernel, or (backend "reference", or the kernel unavailable) the
    composition. Falling back is loud, as for the unfused op; MSDA_BACKEND=cuda makes it an error."""
    global _fused_fallback_logged
    backend = get_backend()
    if backend == "reference":
        return False
    from ops.cuda import fused as cuda_fused

    ok, reason = cuda_fused.is_available(device)
    if ok:
        return True
    if backend == "cuda":
        raise RuntimeError(f"MSDA_BACKEND=cuda but the fused MSDeformAttn kernel is unavailable on {device}: {reason}")
    if not _fused_fallback_logged:
        message = (
            f"ms_deform_attn_fused computes its softmax and sampling locations in PyTorch on {device} (about 2.4x "
            f"the memory traffic of the fused kernel), which is unavailable: {reason}. Check `python -m ops info`; "
            "MSDA_BACKEND=cuda turns this warning into an error."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning("%s", message)
        _fused_fallback_logged = True
    return False
