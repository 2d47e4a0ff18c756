"""CUDA sources compiled at first use by NVRTC for one GPU architecture, cached, loaded on a device.

No nvcc: NVRTC, NVIDIA's runtime compiler, and the CUDA headers come from the ``nvidia-cuda-nvrtc``
and ``nvidia-cuda-runtime`` wheels (``pip install 'msda-ops[cuda]'``); ``cuda-bindings``, NVIDIA's
Python bindings, drive NVRTC and the driver (cuda-core's Program would do the compile too, but
wants a driver even for PTX, which CI machines lack). Reusable for any .cu (kernel names are C++ name
expressions, so templates need no ``extern "C"`` wrappers):

    path = build(source, names, "sm_90")           # cubin in the cache, compiled once
    module = GpuModule(path, device_index=0)       # every kernel loaded now (CUDA-graph safe)
    module.launch(name, grid, block, shared_bytes, KernelArgs([...]), stream)

An architecture NVRTC compiles for gets a cubin; one newer than the newest it knows gets PTX for
that newest one, which the driver compiles on load. The cache key covers the source and the headers
next to it, the architecture, NVRTC's version, the options and the names (see ``ops._cache``).
Importing this module imports the bindings: ``ops.cuda.unfused`` imports it only when a GPU needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cuda.bindings import driver, nvrtc

from ops import _cache
from ops.cuda.launch import KernelArgs

STD = "c++17"
_MAGIC = b"msda-nvrtc 1\n"


def _check_nvrtc(result) -> object:
    err, *values = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {err!r}")
    return values[0] if len(values) == 1 else values


def _check_driver(result, what: str) -> object:
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, text = driver.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {text.decode() if text else err!r} ({err!r})")
    return values[0] if len(values) == 1 else values


def version() -> tuple[int, int]:
    """NVRTC's (major, minor)."""
    return tuple(_check_nvrtc(nvrtc.nvrtcVersion()))


# The oldest NVRTC that compiles the kernels: sm_90's float4 atomicAdd arrived in CUDA 12.4's headers.
MIN_NVRTC = (12, 4)
# CUDA's headers the kernels include (the cache key holds their content, not only their folder).
CUDA_HEADERS = ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp")


def check_version() -> None:
    """Raises RuntimeError naming the fix when this NVRTC is older than the kernels need."""
    have = version()
    if have < MIN_NVRTC:
        raise RuntimeError(
            "NVRTC {}.{} is older than the kernels need ({}.{}): pip install 'msda-ops[cuda12]' or "
            "'msda-ops[cuda]' (CUDA 13)".format(*have, *MIN_NVRTC)
        )


# The oldest driver release that runs what each NVRTC major version emits (minor-version compatibility).
MIN_DRIVER = {12: 525, 13: 580}


def driver_status() -> tuple[bool, str]:
    """(new enough, one line): the installed driver against what this NVRTC's code needs."""
    major, minor = version()
    need = MIN_DRIVER.get(major)
    needs = f"NVRTC {major}.{minor} needs a driver >= {need} (CUDA {major})" if need else f"NVRTC {major}.{minor}"
    release = Path("/proc/driver/nvidia/version")
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", release.read_text()) if release.is_file() else None
    try:
        cuda = _check_driver(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    except Exception:  # no driver library: a machine without a GPU
        return False, f"no NVIDIA driver found; {needs}"
    have = f"driver {found.group(1) if found else '?'} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
    if cuda // 1000 >= major:
        return True, f"{have}; {needs}"
    fix = f"install a driver >= {need}" if need else "install a newer driver"
    return False, f"{have} is too old: {needs}; {fix}, or pip install 'msda-ops[cuda12]' for CUDA 12's NVRTC"


def supported_archs() -> list[int]:
    """The architectures NVRTC emits cubins for, as numbers (80, 90, 100, 120, ...)."""
    return sorted(int(a) for a in _check_nvrtc(nvrtc.nvrtcGetSupportedArchs()))


def include_dirs() -> list[str]:
    """Folders holding cuda_fp16.h and friends: the runtime wheel's, else $CUDA_HOME/include."""
    found = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        # The headers of NVRTC's own major version first: the cuda12 route must not build against 13's.
        major = version()[0]
        subs = [f"cu{major}/include", "cuda_runtime/include", "cu13/include", "cu12/include"]
        for base in nvidia.__path__:
            for sub in dict.fromkeys(subs):
                if (Path(base) / sub / "cuda_fp16.h").is_file():
                    found.append(str(Path(base) / sub))
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "include" / "cuda_fp16.h").is_file():
        found.append(str(Path(cuda_home) / "include"))
    if not found:
        raise RuntimeError(
            "CUDA headers (cuda_fp16.h) not found: pip install 'msda-ops[cuda]' (the nvidia-cuda-runtime wheel) "
            "or set CUDA_HOME"
        )
    return found[:1]  # one CUDA version's headers, never a mix


def target(arch: str) -> tuple[str, str]:
    """(code type, NVRTC arch) for a device architecture: ("cubin", "sm_90"), or ("ptx", "compute_120")
    for a GPU newer than this NVRTC knows.

    Raises:
        RuntimeError: the architecture is older than NVRTC supports (it names the fix).
    """
    match = re.fullmatch(r"sm_(\d+)([af]?)", arch)
    if match is None:
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    number, supported = int(match.group(1)), supported_archs()
    if number in supported:
        return "cubin", arch
    if number > supported[-1]:
        return "ptx", f"compute_{supported[-1]}"
    major, minor = version()
    raise RuntimeError(
        f"NVRTC {major}.{minor} compiles for sm_{supported[0]}..sm_{supported[-1]}, not {arch}: install the NVRTC "
        f"of an older CUDA (e.g. pip install nvidia-cuda-nvrtc-cu12 cuda-bindings==12.*) for this GPU"
    )


def compile_source(source: Path, names: Sequence[str], arch: str) -> tuple[str, bytes, dict[str, str], str]:
    """One NVRTC compile: (code type, code, {name expression: lowered symbol}, NVRTC's log).

    Raises:
        RuntimeError: the compile failed (the message holds NVRTC's log).
    """
    check_version()
    kind, nvrtc_arch = target(arch)
    options = [f"--gpu-architecture={nvrtc_arch}", f"--std={STD}", f"--include-path={source.parent}"]
    with _compiled(source, names, options, arch) as (program, log):
        get_size, get = (
            (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
            if kind == "cubin"
            else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        )
        code = _output(program, get_size, get)
        if kind == "ptx":
            code = code.rstrip(b"\0")
        return kind, code, _lowered_names(program, names), log


def compile_with_report(source: Path, names: Sequence[str], arch: str) -> tuple[str, str, dict[str, str]]:
    """(PTX, ptxas' verbose log, {name expression: lowered symbol}) of one compile for a real ``arch``:
    what the compiled-code checks read (barriers in the PTX, registers and spills in the log).

    Raises:
        RuntimeError: the compile failed (the message holds NVRTC's log).
    """
    options = [f"--gpu-architecture={arch}", f"--std={STD}", f"--include-path={source.parent}", "--ptxas-options=-v"]
    with _compiled(source, names, options, arch) as (program, log):
        ptx = _output(program, nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        return ptx.rstrip(b"\0").decode(), log, _lowered_names(program, names)


@contextlib.contextmanager
def _compiled(source: Path, names: Sequence[str], options: list[str], arch: str) -> Iterator[tuple[Any, str]]:
    """An NVRTC program of ``source`` with ``names`` registered, compiled with ``options`` and the CUDA
    include folders, and its log; destroyed on exit.

    Raises:
        RuntimeError: the compile failed (the message holds NVRTC's log).
    """
    options = options + [f"--include-path={d}" for d in include_dirs()]
    program = _check_nvrtc(nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], []))
    try:
        for name in names:
            _check_nvrtc(nvrtc.nvrtcAddNameExpression(program, name.encode()))
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])
        log = _output(program, nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog)
        log = log.rstrip(b"\0 ").decode(errors="replace")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC failed compiling {source.name} for {arch} ({result!r}):\n{log}")
        yield program, log
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _output(program: Any, get_size: Callable, get: Callable) -> bytes:
    """One of NVRTC's outputs of ``program`` (code or log), as NVRTC wrote it. NVRTC writes into the
    buffer it is handed, so that is a bytearray: a ``bytes`` would be written in place, and for an empty
    log (size 1) ``b" " * 1`` is CPython's shared one-byte object, after which every ``b" "`` of the
    process reads as ``b"\\0"`` (pickle then reads a tensor's size 32 as 0, and torch.load fails)."""
    buffer = bytearray(_check_nvrtc(get_size(program)))
    _check_nvrtc(get(program, buffer))
    return bytes(buffer)


def _lowered_names(program: Any, names: Sequence[str]) -> dict[str, str]:
    """{name expression: lowered symbol} of a compiled program."""
    return {name: _check_nvrtc(nvrtc.nvrtcGetLoweredName(program, name.encode())).decode() for name in names}


def build(source: Path, names: Sequence[str], arch: str) -> Path:
    """Compile ``source`` for ``arch`` into the cache unless it is there; return the cache file."""
    source = Path(source).resolve()
    kind, nvrtc_arch = target(arch)
    headers = sorted(source.parent.glob("*.h"))
    cuda_include = Path(include_dirs()[0])
    key = _cache.content_key(
        [
            "nvrtc",
            source.read_bytes(),
            *[h.name.encode() + h.read_bytes() for h in headers],
            kind,
            nvrtc_arch,
            ".".join(map(str, version())),
            STD,
            *include_dirs(),
            *[(cuda_include / h).read_bytes() for h in CUDA_HEADERS if (cuda_include / h).is_file()],
            *names,
        ]
    )

    def produce(out: Path) -> None:
        kind, code, symbols, log = compile_source(source, names, arch)
        meta = json.dumps({"kind": kind, "arch": nvrtc_arch, "symbols": symbols, "log": log}).encode()
        out.write_bytes(_MAGIC + meta + b"\n" + code)

    return _cache.cached(key, f"{source.stem}.{nvrtc_arch}.bin", produce)


def read(path: Path) -> tuple[dict, bytes]:
    """(metadata, code) of a file written by ``build``."""
    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise RuntimeError(f"{path} is not an NVRTC cache file")
    meta, code = data[len(_MAGIC) :].split(b"\n", 1)
    return json.loads(meta), code


_init_lock = threading.Lock()
_initialized = False


def _primary_context(device_index: int):
    """The device's primary context: the one PyTorch's runtime calls use."""
    global _initialized
    with _init_lock:
        if not _initialized:
            _check_driver(driver.cuInit(0), "cuInit")
            _initialized = True
    device = _check_driver(driver.cuDeviceGet(device_index), f"cuDeviceGet({device_index})")
    return _check_driver(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")


class GpuModule:
    """A cache file loaded on one CUDA device, every kernel resolved and loaded up front.

    Loading at construction (not at first launch) matters under lazy module loading, the default
    since CUDA 12.2: a kernel first launched inside a CUDA-graph capture would load its code
    during the capture, which is forbidden.
    """

    def __init__(self, path: Path, device_index: int) -> None:
        meta, code = read(path)
        self.arch = meta["arch"]
        self.device_index = device_index
        context = self._context = _primary_context(device_index)
        _check_driver(driver.cuCtxPushCurrent(context), "cuCtxPushCurrent")
        try:
            image = code + b"\0" if meta["kind"] == "ptx" else code
            self._module = _check_driver(driver.cuModuleLoadData(image), f"loading the {self.arch} kernels")
            self._functions = {}
            for name, symbol in meta["symbols"].items():
                function = _check_driver(driver.cuModuleGetFunction(self._module, symbol.encode()), name)
                # Under lazy loading a function's code loads at its first launch unless asked for
                # now; cuFuncLoad (CUDA 12.4+) asks. Older drivers lack it: there, graph capture
                # needs CUDA_MODULE_LOADING=EAGER (or a warm-up launch of each variant).
                try:
                    result = driver.cuFuncLoad(function)
                except Exception:  # the symbol is missing from a driver before 12.4
                    result = None
                if result is not None:
                    _check_driver(result, f"loading {name}")
                self._functions[name] = function
        finally:
            driver.cuCtxPopCurrent()
        self.names = tuple(self._functions)
        self._checked: set[str] = set()

    def _check_arguments(self, name: str, function, args: KernelArgs) -> None:
        """Once per kernel: the argument sizes match the kernel's parameters (the emulation checks
        the same from the C++ types), so a Dims out of step with the .cu fails loudly, not silently."""
        for i, size in enumerate(args.sizes):
            try:
                err, _, param_size = driver.cuFuncGetParamInfo(function, i)
            except Exception:  # a driver before CUDA 12.4 has no cuFuncGetParamInfo: cannot check
                return
            if err != driver.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"{name} takes fewer than {len(args)} arguments (parameter {i}: {err!r})")
            if param_size != size:
                raise RuntimeError(
                    f"{name}: argument {i} is {param_size} bytes on the device, the caller passed {size}"
                )
        self._checked.add(name)

    def registers(self, name: str) -> int:
        """Registers per thread of kernel ``name`` (what ptxas settled on)."""
        self._make_current()
        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS
        return _check_driver(driver.cuFuncGetAttribute(attr, self._functions[name]), name)

    def _make_current(self) -> None:
        """Makes this device's primary context current on the calling thread. PyTorch binds it to a
        thread lazily (autograd's device threads, a fresh thread, a process that has not touched the
        GPU yet); a launch or a query of a kernel needs it current."""
        if int(_check_driver(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")) != int(self._context):
            _check_driver(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")

    def launch(self, name, grid, block, shared_bytes, args: KernelArgs, stream: int = 0) -> None:
        """Queue kernel ``name`` on ``stream`` (a cudaStream_t as int) of this device."""
        function = self._functions.get(name)
        if function is None:
            raise KeyError(f"no kernel {name!r} in this module; it holds {sorted(self._functions)}")
        self._make_current()
        if name not in self._checked:
            self._check_arguments(name, function, args)
        _check_driver(
            driver.cuLaunchKernel(function, *grid, *block, shared_bytes, driver.CUstream(stream), args.address, 0),
            f"launching {name} (grid {tuple(grid)}, block {tuple(block)})",
        )
