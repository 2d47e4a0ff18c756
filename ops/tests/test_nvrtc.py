"""The kernels compile with NVRTC for sm_80, sm_90, sm_100 and sm_120 without a GPU or nvcc; the build
cache, the architecture choice and availability on a machine without CUDA.

Needs the ``cuda`` extra (cuda-bindings, nvidia-cuda-nvrtc, nvidia-cuda-runtime), which
``./dev test`` installs.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ops import _cache
from ops.cuda import fused as cuda_fused
from ops.cuda import unfused as cuda_unfused

nvrtc = pytest.importorskip("ops.cuda.build", reason="the cuda extra is not installed: pip install 'msda-ops[cuda]'")

ARCHS = ("sm_80", "sm_90", "sm_100", "sm_120")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every architecture compiled once into a fresh cache: (cache folder, {arch: (path, seconds)}). Two
    architectures at a time: NVRTC lets go of the GIL while it compiles."""
    cache = tmp_path_factory.mktemp("nvrtc-cache")

    def build(arch: str) -> tuple[str, tuple]:
        start = time.perf_counter()
        path = cuda_unfused.build(arch)
        seconds = time.perf_counter() - start
        cuda_fused.build(arch)  # `python -m ops build` builds both sources
        return arch, (path, seconds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSDA_CACHE_DIR", str(cache))
        with ThreadPoolExecutor(2) as pool:
            results = dict(pool.map(build, ARCHS))
    return cache, results


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(built, arch):
    path, seconds = built[1][arch]
    meta, code = nvrtc.read(path)
    assert meta["kind"] == "cubin" and meta["arch"] == arch
    assert code[:4] == b"\x7fELF", f"{arch}: not a cubin"
    assert sorted(meta["symbols"]) == sorted(cuda_unfused.KERNEL_NAMES), f"{arch}: {sorted(meta['symbols'])}"
    assert all(symbol.startswith("_ZN4msda") for symbol in meta["symbols"].values())
    assert "warning" not in meta["log"].lower(), meta["log"]
    print(f"NVRTC {arch}: {seconds:.1f} s, {len(code) / 1e3:.0f} kB")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_fused_kernel_compiles(built, arch, monkeypatch):
    monkeypatch.setenv("MSDA_CACHE_DIR", str(built[0]))
    monkeypatch.setattr(nvrtc, "compile_source", lambda *a: pytest.fail("compiled again"))
    meta, code = nvrtc.read(cuda_fused.build(arch))  # built by the fixture: found in the cache
    assert meta["kind"] == "cubin" and code[:4] == b"\x7fELF", arch
    assert sorted(meta["symbols"]) == sorted(cuda_fused.KERNEL_NAMES), f"{arch}: {sorted(meta['symbols'])}"
    assert "warning" not in meta["log"].lower(), meta["log"]


def test_build_is_cached(built, monkeypatch):
    cache, results = built
    monkeypatch.setenv("MSDA_CACHE_DIR", str(cache))
    monkeypatch.setattr(nvrtc, "compile_source", lambda *a: pytest.fail("compiled again"))
    assert cuda_unfused.build("9.0") == results["sm_90"][0]  # same key: found, no compile


def test_python_m_ops_build_and_info(built, monkeypatch, capsys):
    from ops.__main__ import main

    cache, results = built
    monkeypatch.setenv("MSDA_CACHE_DIR", str(cache))
    monkeypatch.setattr(nvrtc, "compile_source", lambda *a: pytest.fail("compiled again"))
    assert main(["build", "sm_80", "90"]) == 0
    out = capsys.readouterr().out
    assert f"sm_80: {results['sm_80'][0]}" in out and f"sm_90: {results['sm_90'][0]}" in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiler: NVRTC 1" in out and f"cache: {cache}" in out and "CUDA kernel: " in out


def test_a_compile_leaves_the_process_s_one_byte_objects_alone(tmp_path):
    """NVRTC writes its outputs into the buffers it is handed; into ``b" " * 1`` (an empty log's size)
    that was CPython's shared b" ", and a tensor of 32 elements came back from torch.load as 0."""
    log = nvrtc.compile_source(cuda_unfused.SOURCE, cuda_unfused.KERNEL_NAMES[:1], "sm_80")[3]
    assert log == ""  # the size-1 buffer of the bug
    assert io.BytesIO(bytes([32])).read(1)[0] == 32
    torch.save(torch.zeros(32), tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt", weights_only=True).numel() == 32


def test_architecture_choice():
    newest = nvrtc.supported_archs()[-1]
    assert nvrtc.target("sm_90") == ("cubin", "sm_90")
    assert nvrtc.target("sm_990") == ("ptx", f"compute_{newest}")  # newer than NVRTC knows: PTX, JIT on load
    with pytest.raises(RuntimeError, match=r"not sm_50: install the NVRTC of an older CUDA"):
        nvrtc.target("sm_50")


def test_ptx_for_a_newer_gpu_compiles(cache_dir):
    meta, code = nvrtc.read(cuda_unfused.build("sm_990"))
    assert meta["kind"] == "ptx" and b".entry _ZN4msda14forward_kernel" in code


def test_cache_builds_once_under_concurrency_and_cleans_up_failures(cache_dir):
    produced = []

    def produce(out):
        time.sleep(0.3)
        produced.append(out)
        out.write_bytes(b"payload")

    key = _cache.content_key(["test", "one"])
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(_cache.cached(key, "x.bin", produce))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(produced) == 1 and len(set(paths)) == 1 and paths[0].read_bytes() == b"payload"
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["build.lock", "x.bin", "x.bin.sha256"]

    def broken(out):
        out.write_bytes(b"half")
        raise RuntimeError("compiler said no")

    other = _cache.content_key(["test", "two"])
    with pytest.raises(RuntimeError, match="compiler said no"):
        _cache.cached(other, "x.bin", broken)
    assert [p.name for p in (cache_dir / other).iterdir()] == ["build.lock"]

    paths[0].write_bytes(b"pay")  # truncated (or otherwise corrupt): rebuilt
    assert _cache.cached(key, "x.bin", produce).read_bytes() == b"payload" and len(produced) == 2


def test_content_key_separates_parts():
    assert _cache.content_key(["ab", "c"]) != _cache.content_key(["a", "bc"])


@pytest.mark.parametrize(
    ("arch", "expected"), [("sm_90", "sm_90"), ("90", "sm_90"), ("8.6", "sm_86"), ("100", "sm_100")]
)
def test_normalize_arch(arch, expected):
    assert cuda_unfused.normalize_arch(arch) == expected


@pytest.mark.parametrize("arch", ["9", "hopper", "sm_9x"])
def test_normalize_arch_rejects(arch):
    with pytest.raises(ValueError, match="arch"):
        cuda_unfused.normalize_arch(arch)


@pytest.mark.parametrize(("capability", "arch"), [((8, 0), "sm_80"), ((9, 0), "sm_90"), ((12, 0), "sm_120")])
def test_arch_for_capability(capability, arch):
    assert cuda_unfused.arch_for_capability(capability) == arch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_is_available_without_cuda_says_why(monkeypatch):
    monkeypatch.setattr(cuda_unfused.KERNELS, "availability", {})
    ok, reason = cuda_unfused.is_available()
    assert ok is False and "no CUDA device" in reason
    assert cuda_unfused.is_available(torch.device("cuda", 1)) == (
        False,
        "no CUDA device (torch.cuda.is_available() is False)",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_ops_info_fails_where_msda_backend_cuda_cannot_have_its_kernels(monkeypatch, capsys):
    from ops.__main__ import main

    assert main(["info"]) == 0  # auto: the reference runs, which info reports
    monkeypatch.setenv("MSDA_BACKEND", "cuda")
    assert main(["info"]) == 1
    assert capsys.readouterr().err == "MSDA_BACKEND=cuda asks for the CUDA kernels and they are unavailable here\n"


def test_an_nvrtc_older_than_the_kernels_need_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(nvrtc, "version", lambda: (12, 3))  # compiles, but lacks sm_90's float4 atomicAdd
    with pytest.raises(RuntimeError, match=r"NVRTC 12\.3 is older than the kernels need \(12\.4\)"):
        nvrtc.compile_source(cuda_unfused.SOURCE, cuda_unfused.KERNEL_NAMES, "sm_80")


def test_the_cache_key_holds_the_cuda_headers_content(tmp_path, monkeypatch):
    (tmp_path / "cuda_fp16.h").write_text("// one release")
    monkeypatch.setattr(nvrtc, "include_dirs", lambda: [str(tmp_path)])
    monkeypatch.setattr(nvrtc._cache, "cached", lambda key, name, produce: key)
    before = nvrtc.build(cuda_unfused.SOURCE, cuda_unfused.KERNEL_NAMES, "sm_80")
    (tmp_path / "cuda_fp16.h").write_text("// another release, same folder")
    assert nvrtc.build(cuda_unfused.SOURCE, cuda_unfused.KERNEL_NAMES, "sm_80") != before


def test_a_probe_that_fails_inside_a_graph_capture_is_not_kept(monkeypatch):
    monkeypatch.setattr(cuda_unfused.KERNELS, "availability", {})
    monkeypatch.setattr(cuda_unfused.KERNELS, "_probe", lambda index: (False, "loading failed while capturing"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert cuda_unfused.KERNELS.is_available(0) == (False, "loading failed while capturing")
    assert cuda_unfused.KERNELS.availability == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_unfused.KERNELS.is_available(0)
    assert cuda_unfused.KERNELS.availability == {0: (False, "loading failed while capturing")}
