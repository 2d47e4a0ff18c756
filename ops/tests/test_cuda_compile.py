"""The CUDA kernel compiles for sm_80 and sm_90, and ops._cuda builds, caches and reports availability.

Runs without a GPU: compiling needs only nvcc, and the cache logic is checked with a stand-in nvcc.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from ops import _cuda

ARCHS = ("sm_80", "sm_90")
# 2 directions x 4 dtypes x {vectorized, scalar} kernels.
KERNELS_PER_ARCH = 16

needs_nvcc = pytest.mark.skipif(_cuda.find_nvcc() is None, reason="nvcc not found ($CUDA_HOME/bin or PATH)")


@needs_nvcc
def test_kernel_compiles_for_sm80_and_sm90_without_warnings(tmp_path):
    # One nvcc call builds both architectures (the two ptxas runs go in parallel); ptxas -v names
    # every kernel it compiles per architecture, which proves each one compiled.
    library = tmp_path / "libmsda.so"
    cmd = [_cuda.find_nvcc(), *_cuda.NVCC_FLAGS, "--threads", "2", "-Xptxas", "-v"]
    for arch in ARCHS:
        cmd += _cuda.gencode_flags(arch)
    cmd += ["-Xcompiler", "-Wall,-Wextra", "-o", str(library), str(_cuda.SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    # Our file's warnings only: a newer host compiler may warn inside CUDA's own headers.
    warnings = [line for line in log.splitlines() if "warning" in line.lower() and "ms_deform_attn" in line]
    assert not warnings, log
    for arch in ARCHS:
        compiled = re.findall(rf"Compiling entry function '\w*msda_(?:forward|backward)_kernel\w*' for '{arch}'", log)
        assert len(compiled) == KERNELS_PER_ARCH, f"{arch}: {len(compiled)} kernels compiled\n{log}"

    # The C interface is there and matches ops/_cuda.py; loading needs no GPU.
    lib = _cuda.bind(ctypes.CDLL(str(library)))
    assert lib.msda_abi_version() == _cuda.ABI_VERSION
    assert b"invalid argument" in lib.msda_error_string(1)


def test_cache_key_depends_on_arch_and_compiler():
    version = "Cuda compilation tools, release 13.0, V13.0.88"
    assert _cuda.cache_key("sm_80", version) != _cuda.cache_key("sm_90", version)
    assert _cuda.cache_key("sm_90", version) != _cuda.cache_key("sm_90", version + " other build")
    assert _cuda.cache_key("sm_90", version) == _cuda.cache_key("9.0", version)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("sm_90", "sm_90"), ("90", "sm_90"), ("8.6", "sm_86"), ("sm_90a", "sm_90a"), ("100", "sm_100")],
)
def test_normalize_arch(arch, expected):
    assert _cuda.normalize_arch(arch) == expected


@pytest.mark.parametrize("arch", ["9", "hopper", "sm_9x"])
def test_normalize_arch_rejects(arch):
    with pytest.raises(ValueError, match="arch"):
        _cuda.normalize_arch(arch)


def _fake_nvcc(tmp_path: Path, body: str) -> Path:
    """An executable standing in for nvcc: answers --version, else runs ``body`` (python) with
    ``out`` = the -o path and appends one line per compile to calls.log."""
    script = tmp_path / "nvcc"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""\
            import sys, time
            args = sys.argv[1:]
            if args == ["--version"]:
                print("fake nvcc 1.0")
                sys.exit(0)
            out = args[args.index("-o") + 1]
            with open({str(tmp_path / "calls.log")!r}, "a") as log:
                log.write(" ".join(args) + "\\n")
            """
        )
        + textwrap.dedent(body)
    )
    script.chmod(0o755)
    return script


def test_build_caches_and_builds_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDA_CACHE_DIR", str(tmp_path / "cache"))
    nvcc = _fake_nvcc(tmp_path, "time.sleep(0.5)\nopen(out, 'w').write('library')\n")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(_cuda.build("sm_90", nvcc=str(nvcc)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 4 and len(set(paths)) == 1
    library = paths[0]
    assert library.read_text() == "library"
    assert library.parent.parent == tmp_path / "cache"
    assert library.parent.name == _cuda.cache_key("sm_90", "fake nvcc 1.0\n")
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 1, calls
    assert "arch=compute_90,code=[sm_90,compute_90]" in calls[0]
    # No temporary files left behind, and another arch is another entry.
    assert sorted(p.name for p in library.parent.iterdir()) == ["build.lock", "libmsda.so"]
    assert _cuda.build("sm_80", nvcc=str(nvcc)).parent != library.parent


def test_build_failure_raises_with_nvcc_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDA_CACHE_DIR", str(tmp_path / "cache"))
    nvcc = _fake_nvcc(tmp_path, "sys.stderr.write('error: something specific\\n')\nsys.exit(2)\n")
    with pytest.raises(RuntimeError, match="something specific"):
        _cuda.build("sm_90", nvcc=str(nvcc))
    (entry,) = (tmp_path / "cache").iterdir()
    assert not (entry / "libmsda.so").exists()
    assert [p.name for p in entry.iterdir()] == ["build.lock"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_is_available_without_cuda_says_why(monkeypatch):
    monkeypatch.setattr(_cuda, "_availability", {})
    ok, reason = _cuda.is_available()
    assert ok is False
    assert "CUDA" in reason
    assert _cuda.is_available() == (ok, reason)  # cached
    assert _cuda.is_available(torch.device("cuda", 1)) == (ok, reason)


@pytest.mark.parametrize(
    ("capability", "arch"), [((8, 0), "sm_80"), ((8, 6), "sm_86"), ((9, 0), "sm_90"), ((12, 0), "sm_120")]
)
def test_arch_for_capability(capability, arch):
    assert _cuda.arch_for_capability(capability) == arch


def test_arch_for_capability_rejects():
    with pytest.raises(ValueError, match=r"capability must be .*got \(8, 10\)"):
        _cuda.arch_for_capability((8, 10))


# A machine with an A100 (cuda:0), an H100 (cuda:1) and a second A100 (cuda:2).
CAPABILITIES = {0: (8, 0), 1: (9, 0), 2: (8, 0)}


def _index(device) -> int:
    return device if isinstance(device, int) else torch.device(device).index


def test_load_builds_and_keeps_one_library_per_device_architecture(monkeypatch):
    monkeypatch.setattr(_cuda, "_libs", {})
    monkeypatch.setattr(_cuda, "_device_arch", {})
    asked = []
    monkeypatch.setattr(
        torch.cuda,
        "get_device_capability",
        lambda device=None: asked.append(_index(device)) or CAPABILITIES[_index(device)],
    )
    built = []
    monkeypatch.setattr(_cuda, "build", lambda arch: built.append(arch) or Path(f"/cache/{arch}/libmsda.so"))
    monkeypatch.setattr(_cuda.ctypes, "CDLL", lambda path: f"library at {path}")
    monkeypatch.setattr(_cuda, "bind", lambda lib: lib)
    a100 = _cuda.load(device=torch.device("cuda", 0))
    h100 = _cuda.load(device=torch.device("cuda", 1))
    assert (a100, h100) == ("library at /cache/sm_80/libmsda.so", "library at /cache/sm_90/libmsda.so")
    assert _cuda.load(device=torch.device("cuda", 2)) is a100  # same architecture: same library
    assert _cuda.load(device=1) is h100
    assert _cuda.load("9.0") is h100  # an explicit arch wins over the device
    assert built == ["sm_80", "sm_90"]
    assert _cuda.load(device=torch.device("cuda", 0)) is a100
    assert asked == [0, 1, 2], "each device's capability is asked once, not on every call"


def test_is_available_asks_once_per_device(monkeypatch):
    monkeypatch.setattr(_cuda, "_availability", {})
    probed = []
    monkeypatch.setattr(_cuda, "_probe", lambda index: probed.append(index) or (index != 1, f"answer for {index}"))
    assert _cuda.is_available(torch.device("cuda", 0)) == (True, "answer for 0")
    assert _cuda.is_available("cuda:1") == (False, "answer for 1")
    assert _cuda.is_available(0) == (True, "answer for 0")
    assert probed == [0, 1]
