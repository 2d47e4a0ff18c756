"""Multi-scale deformable attention: CUDA and CPU kernels built on first use, a PyTorch reference, one op.

Public interface (versioned by ``__version__``): ``ms_deform_attn``, ``MSDeformAttn``,
``ms_deform_attn_fused``, ``ms_deform_attn_reference``, ``set_backend``/``get_backend``,
``cuda_kernel_available``, ``cpu_kernel_available``.
"""

from ops.backend import get_backend, set_backend
from ops.functional import ms_deform_attn
from ops.fused import ms_deform_attn_fused
from ops.modules import MSDeformAttn
from ops.reference import ms_deform_attn_reference

__version__ = "1.0.0"


def cuda_kernel_available(device=None) -> tuple[bool, str]:
    """(True, "") when the CUDA kernel can run on ``device`` (default: the current CUDA device), else
    (False, the reason)."""
    from ops.cuda import unfused as cuda_unfused

    return cuda_unfused.is_available(device)


def cpu_kernel_available() -> tuple[bool, str]:
    """(True, "") when the CPU kernel is built (building it on the first call) and loads, else (False, the reason)."""
    from ops.cpu import build as cpu_build

    return cpu_build.is_available()


__all__ = [
    "MSDeformAttn",
    "cpu_kernel_available",
    "cuda_kernel_available",
    "get_backend",
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "ms_deform_attn_reference",
    "set_backend",
]
