"""Build (with the machine's C++ compiler, cached) and load (with ctypes) the CPU kernel in ``ops/csrc``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Like the CUDA kernel (``ops/cuda/``): no torch C++ extension machinery. ``c++ -shared`` builds
``libmsda_cpu.so`` once per (sources, compiler, flags, machine architecture) under ``$MSDA_CACHE_DIR``
(default ``~/.cache/msda_ops``), ctypes loads it, and tensors cross as raw pointers. The compiler is
``$CXX`` when set, else ``c++``, ``g++`` or ``clang++`` on PATH. The library is built for the
architecture's baseline (no ``-march=native``: the cache may be shared by different CPUs); on x86-64
with GCC the kernel carries an AVX2/FMA copy that the loader picks on CPUs that have it;
``MSDA_CPU_ISA=baseline`` builds it without that copy (its own cache entry), so that the copy every
other CPU runs can be run and tested on an AVX2 machine. Nothing happens at import time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

from ops import _cache

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "ms_deform_attn_cpu.cpp"
HEADERS = (CSRC / "bilinear.h",)
# Must equal MSDA_CPU_ABI_VERSION in ms_deform_attn_cpu.cpp: a cached library with other signatures is rejected.
ABI_VERSION = 1
# Part of the cache key, so changing them rebuilds.
CXX_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-pthread")
# $MSDA_CPU_ISA: "auto" keeps the x86-64-v3 copy; "baseline" leaves it out (the copy non-AVX2 CPUs run).
ISA_FLAGS = {"auto": (), "baseline": ("-DMSDA_CPU_BASELINE",)}


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


def cxx_flags() -> tuple[str, ...]:
    """The compiler flags: ``CXX_FLAGS`` and those of ``$MSDA_CPU_ISA`` (read on each call)."""
    isa = os.environ.get("MSDA_CPU_ISA", "auto").strip().lower() or "auto"
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"MSDA_CPU_ISA must be one of {', '.join(ISA_FLAGS)}, got {isa!r}")
    return (*CXX_FLAGS, *ISA_FLAGS[isa])


def cache_key(cxx: str, version_text: str, flags: tuple[str, ...]) -> str:
    """The cache entry of the library: sources, compiler, flags and machine architecture."""
    return "cpu-" + _cache.content_key(
        (
            SOURCE.read_bytes(),
            *(h.read_bytes() for h in HEADERS),
            cxx,
            version_text,
            "\0".join(flags),
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
        RuntimeError: no compiler, the compiler fails (the message holds its stderr), or ``$MSDA_CPU_ISA``
            is not auto or baseline.
    """
    flags = cxx_flags()
    if cxx is None:
        cxx, reason = find_compiler()
        if cxx is None:
            raise RuntimeError(reason)

    def produce(tmp: Path) -> None:
        cmd = [cxx, *flags, "-o", str(tmp), str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{cxx} failed (exit code {proc.returncode}) building {SOURCE.name}\n"
                f"command: {' '.join(cmd)}\n{(proc.stderr or proc.stdout).strip()}"
            )
        os.chmod(tmp, 0o755)

    return _cache.cached(cache_key(cxx, compiler_version(cxx), flags), "libmsda_cpu.so", produce)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of ms_deform_attn_cpu.cpp on a loaded library and check its ABI version."""
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.msda_cpu_abi_version.argtypes = []
    lib.msda_cpu_abi_version.restype = i32
    version = lib.msda_cpu_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(f"libmsda_cpu ABI version is {version}, ops/cpu_unfused.py expects {ABI_VERSION}")
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
