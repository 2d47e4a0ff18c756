"""The C++ CPU kernel against the float64 reference and the naive loop, its gradients, its threads,
its build cache, and the reference path it replaces (plain autograd; the fallback without a compiler)."""

import collections
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from naive import naive_ms_deform_attn
from torch.utils._python_dispatch import TorchDispatchMode

import ops
from ops.cpu import build as cpu_build
from ops.cpu import unfused as cpu_unfused
from ops.reference import ms_deform_attn_reference

REPO = Path(__file__).resolve().parents[2]
SHAPE_SETS = [
    [[3, 4], [1, 5]],  # a 1xW level
    [[5, 6], [3, 3], [1, 1]],  # a 1x1 level
    [[2, 7], [4, 1], [1, 1], [3, 2]],  # four levels, a Hx1 level
]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    """Every test here needs the kernel built; a machine without a C++ compiler skips them."""
    cxx, reason = cpu_build.find_compiler()
    if cxx is None:
        pytest.skip(reason)
    ok, reason = ops.cpu_kernel_available()
    assert ok, reason


@pytest.fixture
def backend():
    """Sets the op's backend for one test and restores the default afterwards."""
    yield ops.set_backend
    ops.set_backend(None)


@pytest.mark.parametrize("D", [1, 3, 30, 32, 71])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=["1xW", "1x1", "L4"])
def test_forward_matches_naive_loop_and_reference(inputs_factory, shapes, D):
    value, ss, lsi, loc, attn = inputs_factory(shapes, D=D, M=2, Lq=3, P=2, seed=D)
    expected = naive_ms_deform_attn(value, ss, loc, attn)
    got = cpu_unfused.forward(value, ss, lsi, loc, attn)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, ms_deform_attn_reference(value, ss, lsi, loc, attn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("D", [1, 3, 32, 71])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=["1xW", "1x1", "L4"])
def test_backward_matches_naive_autograd(inputs_factory, shapes, D):
    value, ss, lsi, loc, attn = inputs_factory(shapes, N=1, D=D, M=2, Lq=2, P=2, seed=D)
    ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = naive_ms_deform_attn(ins[0], ss, ins[1], ins[2])
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    expected = torch.autograd.grad(out, ins, grad_out)
    got = cpu_unfused.backward(grad_out, value, ss, lsi, loc, attn)
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("loc_range", [(0.05, 0.95), (-0.3, 1.3)], ids=["inside", "across-the-border"])
def test_gradcheck_public_op(inputs_factory, backend, backend_name, loc_range):
    backend(backend_name)
    value, ss, lsi, loc, attn = inputs_factory([[3, 4], [2, 2], [1, 1]], N=2, Lq=2, M=2, D=3, P=2, loc_range=loc_range)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, lc, a: ops.ms_deform_attn(v, ss, lsi, lc, a), (value, loc, attn), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_against_float64(inputs_factory, dtype):
    value, ss, lsi, loc, attn = inputs_factory([[9, 11], [5, 6], [3, 3]], N=2, Lq=7, M=3, D=20, P=4, dtype=dtype)
    out = cpu_unfused.forward(value, ss, lsi, loc, attn)
    assert out.dtype == dtype
    # The float64 truth of the same stored values: only the accumulation and output rounding differ.
    expected = ms_deform_attn_reference(value.double(), ss, lsi, loc.double(), attn.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ins = [t.double().requires_grad_(True) for t in (value, loc, attn)]
    ref_out = ms_deform_attn_reference(ins[0], ss, lsi, ins[1], ins[2])
    expected_grads = torch.autograd.grad(ref_out, ins, grad_out.double())
    got = cpu_unfused.backward(grad_out, value, ss, lsi, loc, attn)
    assert [g.dtype for g in got] == [dtype, torch.float32, torch.float32]
    for g, e in zip(got, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * 10)


def test_nan_and_inf_locations_contribute_nothing(inputs_factory):
    value, ss, lsi, loc, attn = inputs_factory([[4, 5], [2, 3]], N=1, Lq=4, M=2, D=5, P=3)
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    for (q, m, level, p), v in zip([(0, 0, 0, 0), (1, 1, 1, 2), (2, 0, 1, 1), (3, 1, 0, 0)], [0, 1, 2, 3]):
        loc[0, q, m, level, p] = [float("nan"), float("inf"), float("-inf"), 1e30][v]
        bad[0, q, m, level, p] = True
    # The truth: those points weighted zero (and moved anywhere finite).
    clean_loc = torch.where(bad[..., None], torch.full_like(loc, 0.5), loc)
    clean_attn = attn.masked_fill(bad, 0.0)
    expected = ms_deform_attn_reference(value, ss, lsi, clean_loc, clean_attn)
    out = cpu_unfused.forward(value, ss, lsi, loc, attn)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    g_value, g_loc, g_attn = cpu_unfused.backward(grad_out, value, ss, lsi, loc, attn)
    assert torch.isfinite(g_value).all() and torch.isfinite(g_loc).all() and torch.isfinite(g_attn).all()
    assert (g_loc[bad] == 0).all() and (g_attn[bad] == 0).all()
    ins = [t.clone().requires_grad_(True) for t in (value, clean_loc, clean_attn)]
    ref = torch.autograd.grad(ms_deform_attn_reference(ins[0], ss, lsi, ins[1], ins[2]), ins, grad_out)
    torch.testing.assert_close(g_value, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_loc[~bad], ref[1][~bad], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(inputs_factory, dtype):
    # Big enough that the kernel really splits the work (above its ~64k multiply-add threshold).
    value, ss, lsi, loc, attn = inputs_factory([[16, 20], [8, 10], [4, 5]], N=2, Lq=64, M=4, D=32, P=4, dtype=dtype)
    grad_out = torch.randn(2, 64, 4 * 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    runs = {
        n: (
            cpu_unfused.forward(value, ss, lsi, loc, attn, num_threads=n),
            *cpu_unfused.backward(grad_out, value, ss, lsi, loc, attn, num_threads=n),
        )
        for n in (1, 2, 3)
    }
    for n in (2, 3):
        for a, b in zip(runs[1], runs[n]):
            assert torch.equal(a, b), f"{n} threads differ from 1 thread"


def test_kernel_rejects_a_level_table_that_does_not_fit(inputs_factory):
    value, ss, lsi, loc, attn = inputs_factory([[3, 4], [2, 2]])
    with pytest.raises(RuntimeError, match="msda_cpu_forward failed: sizes"):
        cpu_unfused.forward(value, torch.tensor([[3, 4], [3, 3]]), lsi, loc, attn)  # 12 + 9 > S = 16


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_backward_samples_nothing_again(inputs_factory, backend, backend_name):
    """The backward reuses the forward's samples: no grid_sample in it (the vjp path re-ran one per level)."""
    backend(backend_name)
    value, ss, lsi, loc, attn = inputs_factory([[4, 5], [2, 3], [1, 1]], dtype=torch.float32)
    ins = [t.requires_grad_(True) for t in (value, loc, attn)]
    with _CountOps() as forward_ops:
        out = ops.ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2])
    with _CountOps() as backward_ops:
        out.sum().backward()
    assert backward_ops.counts["grid_sampler_2d"] == 0, backward_ops.counts
    if backend_name == "reference":
        assert forward_ops.counts["grid_sampler_2d"] == 3 and backward_ops.counts["grid_sampler_2d_backward"] == 3
    else:
        assert forward_ops.counts["grid_sampler_2d"] == 0 and backward_ops.counts["backward"] == 1


def test_cache_key_depends_on_sources_compiler_and_flags(monkeypatch):
    flags = cpu_build.cxx_flags()
    key = cpu_build.cache_key("/usr/bin/g++", "g++ 12.2.0", flags)
    assert key == cpu_build.cache_key("/usr/bin/g++", "g++ 12.2.0", flags)
    assert key != cpu_build.cache_key("/usr/bin/g++", "g++ 13.1.0", flags)
    assert key != cpu_build.cache_key("/usr/bin/clang++", "g++ 12.2.0", flags)
    assert key != cpu_build.cache_key("/usr/bin/g++", "g++ 12.2.0", (*flags, "-DEXTRA"))
    monkeypatch.setenv("MSDA_CPU_ISA", "baseline")
    assert cpu_build.cxx_flags() == (*flags, "-DMSDA_CPU_BASELINE")
    monkeypatch.setenv("MSDA_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="MSDA_CPU_ISA must be one of auto, baseline, got 'avx512'"):
        cpu_build.cxx_flags()


_BASELINE_SCRIPT = textwrap.dedent(
    """\
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import torch
    import ops
    from conftest import make_inputs
    from ops.cpu import build
    from ops.reference import ms_deform_attn_reference
    ops.set_backend("cpu")  # an error, not the reference path, if the kernel does not build
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        for shapes in ([[3, 4], [2, 2]], [[5, 6], [3, 3], [1, 1]]):
            value, ss, lsi, loc, attn = make_inputs(shapes, D=30, dtype=dtype)
            ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
            ref = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
            out = ops.ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2])
            want = ms_deform_attn_reference(ref[0], ss, lsi, ref[1], ref[2])
            grad = torch.linspace(-1, 1, want.numel(), dtype=torch.float64).view_as(want)
            out.backward(grad.to(dtype))
            want.backward(grad)
            for g, w in zip([out] + [t.grad for t in ins], [want] + [t.grad for t in ref]):
                torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)
    print(build.build())
    """
)


def run_script(script: str, **env: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python (argv: the repository, this folder), with ``env`` added to the
    environment and no MSDA_BACKEND: what the process picks is the script's to say."""
    env = {**os.environ, **env}
    env.pop("MSDA_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", script, str(REPO), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def clone_symbols(library: Path) -> list[str]:
    nm = subprocess.run(["nm", str(library)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in nm.splitlines() if "forward_f32" in line]


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
def test_baseline_copy_matches_the_reference(tmp_path):
    """MSDA_CPU_ISA=baseline: the copy that CPUs without AVX2 run, run here against the float64 reference."""
    proc = run_script(_BASELINE_SCRIPT, MSDA_CPU_ISA="baseline")
    assert proc.returncode == 0, proc.stderr
    baseline = Path(proc.stdout.strip().splitlines()[-1])
    assert baseline != cpu_build.build()
    # The default library holds an x86-64-v3 copy where GCC builds clones; the baseline one never does.
    assert not [s for s in clone_symbols(baseline) if "x86_64_v3" in s]
    default = clone_symbols(cpu_build.build())
    if any(s.endswith(".default") for s in default):
        assert any(s.endswith(".arch_x86_64_v3") for s in default)


def test_build_compiles_once_under_concurrent_builders(tmp_path, monkeypatch):
    """Three builders into an empty cache: the real compiler runs once, all get the same whole library."""
    real, _ = cpu_build.find_compiler()
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] || echo call >> {tmp_path / "calls.log"}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("MSDA_CACHE_DIR", str(tmp_path / "cache"))
    paths = []
    builders = [threading.Thread(target=lambda: paths.append(cpu_build.build(str(wrapper)))) for _ in range(3)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    assert len(paths) == 3 and len(set(paths)) == 1
    assert (tmp_path / "calls.log").read_text().splitlines() == ["call"]
    library = paths[0]
    assert library.parent.parent == tmp_path / "cache"
    assert sorted(p.name for p in library.parent.iterdir()) == ["build.lock", "libmsda_cpu.so", "libmsda_cpu.so.sha256"]
    lib = cpu_build.bind(__import__("ctypes").CDLL(str(library)))
    assert lib.msda_cpu_abi_version() == cpu_build.ABI_VERSION


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    failing = tmp_path / "cxx"
    failing.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\necho "error: very specific" >&2\nexit 3\n'
    )
    failing.chmod(0o755)
    monkeypatch.setenv("MSDA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="very specific"):
        cpu_build.build(str(failing))
    (entry,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in entry.iterdir()] == ["build.lock"]  # nothing half-written


_FALLBACK_SCRIPT = textwrap.dedent(
    """\
    import logging, sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import ops
    from conftest import make_inputs
    from ops.reference import ms_deform_attn_reference
    value, ss, lsi, loc, attn = make_inputs([[3, 4], [2, 2]])
    for _ in range(2):
        ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = ops.ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2])
        out.sum().backward()
    torch.testing.assert_close(out, ms_deform_attn_reference(value, ss, lsi, loc, attn))
    print("grads", all(t.grad is not None for t in ins))
    ops.set_backend("cpu")
    try:
        ops.ms_deform_attn(value, ss, lsi, loc, attn)
    except RuntimeError as exc:
        print(exc)
    """
)


def test_no_compiler_falls_back_to_the_reference_with_one_log_line(tmp_path):
    cxx = str(tmp_path / "missing" / "c++")
    proc = run_script(_FALLBACK_SCRIPT, CXX=cxx, MSDA_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    grads, forced = proc.stdout.strip().splitlines()
    assert grads == "grads True"
    assert forced.startswith("MSDA backend 'cpu' was forced but the CPU kernel is unavailable: "), forced
    lines = [line for line in proc.stderr.splitlines() if "MSDeformAttn" in line]
    assert lines == [
        f"WARNING ops.backend: MSDeformAttn CPU kernel unavailable (building or loading the CPU kernel failed: "
        f"C++ compiler $CXX={cxx!r} not found); using the PyTorch reference path"
    ], proc.stderr


def test_kernel_compiles_without_warnings(tmp_path):
    cxx, _ = cpu_build.find_compiler()
    cmd = [cxx, *cpu_build.cxx_flags(), "-Wall", "-Wextra", "-o", str(tmp_path / "lib.so"), str(cpu_build.SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_ops_info_names_the_cpu_kernel_and_fails_where_msda_backend_cpu_cannot_have_it(monkeypatch, capsys):
    import ops
    from ops.__main__ import main

    monkeypatch.delenv("MSDA_BACKEND", raising=False)
    assert main(["info"]) == 0
    assert "CPU kernel: available (" in capsys.readouterr().out
    monkeypatch.setattr(ops, "cpu_kernel_available", lambda: (False, "no C++ compiler found"))
    monkeypatch.setenv("MSDA_BACKEND", "cpu")
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == "MSDA_BACKEND=cpu asks for the CPU kernel and it is unavailable here (no C++ compiler found)\n"
    monkeypatch.setenv("MSDA_BACKEND", "gpu")
    assert main(["info"]) == 2
    assert capsys.readouterr().err.startswith("error: MSDA_BACKEND must be one of ")
    assert main(["build", "foo"]) == 2
    assert capsys.readouterr().err == "error: arch must look like 'sm_90', '90' or '9.0', got 'foo'\n"
