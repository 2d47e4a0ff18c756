"""CUDA kernels executed on the CPU: a .cu compiled by g++ against ``csrc/emu/cuda_emu.h``, for tests.

    module = emulation.build_module(source, names, arch="sm_90")   # or sanitize=True
    module.launch("ns::kernel<float, true>", grid, block, shared_bytes, KernelArgs([...]))

Pointers are host pointers (CPU tensors). Each CUDA thread is a fiber; the header checks barriers,
shuffles, votes, alignment, half-precision rounding and shared-memory races against CUDA's rules (see
its top comment), and a violation raises :class:`EmulationError` naming the block, thread, rule and
source line(s). ``arch``
sets ``__CUDA_ARCH__`` (sm_80 -> 800), so the kernel's per-architecture paths are both reachable.
``sanitize=True`` builds with AddressSanitizer and UBSan; such a library loads only in a process
started with libasan preloaded (see ``asan_environment``), so tests run it in a subprocess.

Sources may include headers next to them, and ``<cuda_fp16.h>`` / ``<cuda_bf16.h>`` (empty here: the
header defines the half types); the only rewrite before compiling is ``extern __shared__ T name[];``
-> a pointer to the launch's dynamic shared memory. The GPU and the emulation compile the same text.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ops import _cache
from ops.cuda.launch import KernelArgs

EMU_HEADER = Path(__file__).resolve().parent.parent / "csrc" / "emu" / "cuda_emu.h"
CXX = os.environ.get("CXX", "g++")
# gnu++17 for the `, ##__VA_ARGS__` in the shuffle macros. -ffp-contract=off: no fused multiply-adds the source did not ask for. -fno-strict-aliasing: kernels
# reinterpret arrays as uint4.
FLAGS = (
    "-std=gnu++17",
    "-shared",
    "-fPIC",
    "-g",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",
    "-Wno-unused-variable",
)
# The race check: every load and store of the translation unit calls back into the header.
RACE_CHECK_FLAGS = (
    "-fsanitize=kernel-address",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
    "-DCUDA_EMU_RACE_CHECK=1",
)
# CUDA headers a kernel includes for NVRTC; the emulation header already defines what they declare.
CUDA_HEADERS = ("cuda_fp16.h", "cuda_bf16.h")
OPT_FLAGS = ("-O2",)
SANITIZE_FLAGS = ("-O0", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;"
)


class EmulationError(RuntimeError):
    """A kernel broke a CUDA rule (or a launch was invalid) in the emulation."""


def arch_number(arch: str) -> int:
    """800 for "sm_80", 900 for "sm_90", 1200 for "sm_120": the value of __CUDA_ARCH__."""
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(\d)[af]?", str(arch).strip().lower())
    if match is None:
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return int(match.group(1)) * 100 + int(match.group(2)) * 10


def wrapper_source(source: Path, names: Sequence[str]) -> str:
    """The one translation unit g++ compiles: the header, the kernel source, the kernel table."""
    text = _DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = ::cuda_emu::dynamic_shared<{m.group(1)}>();",
        source.read_text(),
    )
    entries = ",\n".join(f'  ::cuda_emu::kernel_of<&{n}>("{n}", &{n})' for n in names)
    return (
        f'#include "{EMU_HEADER}"\n#line 1 "{source}"\n{text}\n#line 1 "<kernel table>"\n'
        f'extern "C" const ::cuda_emu::Kernel cuda_emu_kernels[] = {{\n{entries}\n}};\n'
        f'extern "C" const int cuda_emu_n_kernels = {len(names)};\n'
    )


def compiler_version() -> str:
    proc = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{CXX} --version failed: {proc.stderr.strip()}")
    return proc.stdout


def build(
    source: Path, names: Sequence[str], arch: str = "sm_90", sanitize: bool = False, optimize: bool = True
) -> Path:
    """Compile ``source`` with its kernels ``names`` into a cached shared library; return its path.

    ``optimize=False`` compiles about 3x faster and runs slower: for one-off builds such as mutants.
    Sanitized builds are never optimized (their compile time dominates).

    Raises:
        RuntimeError: g++ failed (the message holds its diagnostics).
    """
    source = Path(source).resolve()
    mode = SANITIZE_FLAGS if sanitize else (*RACE_CHECK_FLAGS, *(OPT_FLAGS if optimize else ("-O0",)))
    flags = [*FLAGS, *mode, f"-D__CUDA_ARCH__={arch_number(arch)}"]
    wrapper = wrapper_source(source, names)
    headers = sorted(source.parent.glob("*.h"))  # what the source may include
    key = _cache.content_key(
        ["emulation", wrapper, EMU_HEADER.read_bytes(), *[h.read_bytes() for h in headers], compiler_version(), *flags]
    )

    def produce(out: Path) -> None:
        cpp = out.with_name(out.name + ".cpp")
        cpp.write_text(wrapper)
        stubs = out.with_name("cuda_include")
        stubs.mkdir(exist_ok=True)
        for name in CUDA_HEADERS:
            (stubs / name).write_text("// empty: cuda_emu.h defines the half types\n")
        try:
            cmd = [CXX, *flags, "-I", str(source.parent), "-I", str(stubs), "-o", str(out), str(cpp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        finally:
            cpp.unlink()
            for name in CUDA_HEADERS:
                (stubs / name).unlink()
            stubs.rmdir()
        if proc.returncode != 0:
            raise RuntimeError(
                f"{CXX} failed building the emulation of {source.name} for {arch}:\n{proc.stderr.strip()}"
            )

    return _cache.cached(key, "asan.so" if sanitize else "emulation.so", produce)


def libasan() -> str | None:
    """The compiler's libasan.so, or None when it has none."""
    proc = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = proc.stdout.strip()
    return path if proc.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def asan_environment() -> dict[str, str]:
    """os.environ plus what a process needs to load a ``sanitize=True`` library (libasan preloaded)."""
    path = libasan()
    if path is None:
        raise RuntimeError(f"{CXX} has no libasan.so (install libasan for gcc)")
    env = dict(os.environ)
    env["LD_PRELOAD"] = path
    # Leaks: Python's own allocations at exit are not the kernel's; the rest stops at the first error.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


_PC = re.compile(r"\{pc (0x[0-9a-f]+)\}")


def source_lines(library: Path, message: str) -> str:
    """``message`` with each ``{pc 0x...}`` (a code offset in ``library``) replaced by the kernel source
    line it came from: the innermost inlined frame outside the emulation header."""
    offsets = _PC.findall(message)
    if not offsets:
        return message
    proc = subprocess.run(
        ["addr2line", "-e", str(library), "-i", "-a", *offsets], capture_output=True, text=True, check=False
    )
    places: dict[str, str] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("0x"):
            current = f"0x{int(line, 16):x}"
        elif current is not None and current not in places and EMU_HEADER.name not in line and ":" in line:
            places[current] = line.split(" (discriminator")[0]
    return _PC.sub(lambda m: f"({places.get(m.group(1), 'at ' + m.group(1))})", message)


class EmulatedModule:
    """A built emulation library behind the kernel-module interface of ``ops.cuda.launch``."""

    def __init__(self, library: Path, arch: str) -> None:
        lib = ctypes.CDLL(str(library))
        lib.emu_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_int,
        ]
        lib.emu_launch.restype = ctypes.c_int
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_kernel_name.argtypes = [ctypes.c_int]
        lib.emu_kernel_name.restype = ctypes.c_char_p
        self._lib = lib
        self.library = Path(library)
        self.arch = arch
        self.names = tuple(lib.emu_kernel_name(i).decode() for i in range(lib.emu_kernel_count()))
        self.launched: list[str] = []  # kernel names in launch order, so tests see which variant ran

    def launch(self, name, grid, block, shared_bytes, args: KernelArgs, stream: int = 0) -> None:
        del stream  # one CPU thread: everything is in order
        grid_c = (ctypes.c_uint * 3)(*grid)
        block_c = (ctypes.c_uint * 3)(*block)
        code = self._lib.emu_launch(name.encode(), grid_c, block_c, shared_bytes, args.address, args.sizes, len(args))
        if code != 0:
            message = source_lines(self.library, self._lib.emu_last_error().decode())
            raise EmulationError(f"{name} on {self.arch}: {message}")
        self.launched.append(name)

    COUNTERS = ("barriers", "shuffles", "vector_loads", "atomics", "wide_atomics", "warp_syncs")

    def counters(self, reset: bool = False) -> dict[str, int]:
        """What the kernels executed since the last reset: __syncthreads, shuffles and votes, 16-byte
        loads, scalar atomics, float4 atomics (sm_90+ paths) and __syncwarps."""
        out = (ctypes.c_ulonglong * len(self.COUNTERS))()
        self._lib.emu_counters(out)
        if reset:
            self._lib.emu_reset_counters()
        return dict(zip(self.COUNTERS, out))


_modules: dict[tuple, EmulatedModule] = {}


def build_module(
    source: Path, names: Sequence[str], arch: str = "sm_90", sanitize: bool = False, optimize: bool = True
) -> EmulatedModule:
    """The emulated module for (source, names, arch, sanitize, optimize), built once per process."""
    key = (str(source), tuple(names), arch, sanitize, optimize)
    module = _modules.get(key)
    if module is None:
        module = _modules[key] = EmulatedModule(build(source, names, arch, sanitize, optimize), arch)
    return module
