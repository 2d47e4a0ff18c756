"""The fused CUDA kernel executed on the CPU (ops.cuda.emulation: the real .cu under g++, each CUDA thread a
fiber) through its real launcher, against the float64 composition: all dtypes, points and boxes, the
sm_80 (scalar atomics) and sm_90 (float4 atomics) paths, several tiles and chunk loops, border and
non-finite inputs. And a broken copy of the kernel must fail the same comparison."""

import ctypes
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import emulated_cases
import pytest
import torch

from ops.cuda import emulation
from ops.cuda import fused as cuda_fused
from ops.cuda import unfused as cuda_unfused
from ops.fused import _reference_gradient, ms_deform_attn_composed

ARCHS = ("sm_80", "sm_90")
# Largest |got - want| relative to max(1, max |want|), as in ops.bench.common: float32 differs by
# accumulation order, the half types also round value, output and grad_value.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def module(arch, source=cuda_fused.SOURCE):
    return emulation.build_module(source, cuda_fused.KERNEL_NAMES, arch=arch)


def inputs(dtype, ref_dim, shapes=((6, 7), (3, 4), (1, 2)), N=2, Lq=5, M=2, D=8, P=3, seed=0, collide=False):
    """Op inputs; ``collide``: every query samples the same points, so the groups of a warp add to
    the same grad_value rows (the aggregated-atomics path)."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    areas = ss.prod(1)
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    # Reference points a little outside [0, 1] and offsets of a few pixels: many points near or past
    # the border, where neighbours read zero.
    ref = (torch.rand(N, Lq, L, ref_dim, generator=g, dtype=torch.float64) * 1.4 - 0.2).to(coord)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:].abs() * 0.5 + 0.05
    offsets = (torch.randn(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 2).to(coord)
    logits = (torch.randn(N, Lq, M, L, P, generator=g, dtype=torch.float64) * 2).to(coord)
    if collide:
        ref, offsets, logits = (t[:, :1].expand_as(t).contiguous() for t in (ref, offsets, logits))
    return value, ss, lsi, ref, offsets, logits


def truth(value, ss, lsi, ref, offsets, logits, grad_output):
    """Output and gradients of the float64 composition, fed the same (rounded) inputs."""
    leaves = [t.double().requires_grad_() for t in (value, ref, offsets, logits)]
    out = ms_deform_attn_composed(leaves[0], ss, lsi, leaves[1], leaves[2], leaves[3])
    out.backward(grad_output.double())
    return out.detach(), *[t.grad for t in leaves]


def close(got, want, dtype) -> float:
    err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1)).item() if want.numel() else 0.0
    return err <= TOLERANCES[dtype], err


def run_and_compare(mod, dtype, ref_dim, need_grad_value=True, **shape):
    value, ss, lsi, ref, offsets, logits = inputs(dtype, ref_dim, **shape)
    N, Lq, M = offsets.shape[:3]
    grad_output = torch.randn(N, Lq, M * value.shape[-1], generator=torch.Generator().manual_seed(1)).to(dtype)
    out = cuda_fused.forward(value, ss, lsi, ref, offsets, logits, module=mod)
    grad_value, grad_offsets, grad_logits, grad_locations = cuda_fused.backward(
        grad_output, value, ss, lsi, ref, offsets, logits, need_grad_value, True, module=mod
    )
    grad_ref = _reference_gradient(grad_locations, ref, offsets)
    want = truth(value, ss, lsi, ref, offsets, logits, grad_output)
    results = {
        "output": close(out, want[0], dtype),
        "grad_reference_points": close(grad_ref, want[2], dtype),
        "grad_offsets": close(grad_offsets, want[3], dtype),
        "grad_attention_logits": close(grad_logits, want[4], dtype),
    }
    if need_grad_value:
        results["grad_value"] = close(grad_value, want[1], dtype)
    else:
        assert grad_value.numel() == 0
    return results


def assert_all_close(results):
    bad = {name: err for name, (ok, err) in results.items() if not ok}
    assert not bad, f"relative errors over tolerance: {bad}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("collide", [False, True], ids=["spread", "colliding"])
def test_kernel_matches_float64_composition(arch, dtype, ref_dim, collide):
    assert_all_close(run_and_compare(module(arch), dtype, ref_dim, collide=collide))


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.float32, dict(D=1)),  # scalar path, one lane per group
        (torch.float32, dict(D=3, M=3)),  # D not a multiple of CPT
        (torch.bfloat16, dict(D=30)),  # scalar half path, 4 lanes, a partial chunk
        (torch.float32, dict(D=32, P=7)),  # L*P = 21: two forward tiles, three backward tiles
        (torch.float32, dict(D=132, Lq=2, M=1)),  # 33 chunks: G = 32 and two chunk iterations
        (torch.float16, dict(D=71, Lq=3)),
        (torch.float64, dict(D=5, N=3, Lq=7)),  # warps cut off at the end of the grid
        (torch.float32, dict(D=4, P=1)),  # one point per level
    ],
)
def test_shapes(dtype, shape):
    for ref_dim in (2, 4):
        assert_all_close(run_and_compare(module("sm_90"), dtype, ref_dim, **shape))


@pytest.mark.parametrize("arch", ARCHS)
def test_atomics_without_aggregation(arch, monkeypatch):
    monkeypatch.setattr(cuda_fused, "AGGREGATE_ATOMICS", False)
    assert_all_close(run_and_compare(module(arch), torch.float32, 4, collide=True))
    assert_all_close(run_and_compare(module(arch), torch.bfloat16, 2, collide=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_grad_value(arch):
    assert_all_close(run_and_compare(module(arch), torch.float32, 2, need_grad_value=False))


def test_non_finite_logits_and_far_locations():
    mod = module("sm_90")
    value, ss, lsi, ref, offsets, logits = inputs(torch.float32, 2)
    offsets[0, 0, 0, 0, 0] = torch.tensor([1e30, -1e30])  # far outside: reads zeros
    logits[1, 0, 1, 1, 1] = math.nan  # as torch's softmax: NaN for the whole head
    nan_location = offsets.clone()
    nan_location[0, 1, 0, 0, 0, 0] = math.nan  # reads zeros like a far location (as the unfused kernel)
    far_location = offsets.clone()
    far_location[0, 1, 0, 0, 0, 0] = 1e30
    out = cuda_fused.forward(value, ss, lsi, ref, nan_location, logits, module=mod)
    want = ms_deform_attn_composed(value.double(), ss, lsi, ref.double(), far_location.double(), logits.double())
    nan = torch.isnan(want)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    torch.testing.assert_close(out[~nan].double(), want[~nan], rtol=1e-4, atol=1e-5)


def test_an_infinite_value_outside_the_map_reads_zero_both_directions():
    """value[0, 0] = inf and every point of query 0 far outside the map (its neighbours clamp onto row 0
    with weight 0): the output and gradients stay finite, as the reference's."""
    mod = module("sm_90")
    value, ss, lsi, ref, offsets, logits = inputs(torch.float32, 2, N=1, Lq=2)
    value[0, 0] = math.inf
    offsets[0, 0] = -1e3
    out = cuda_fused.forward(value, ss, lsi, ref, offsets, logits, module=mod)
    grad_output = torch.ones_like(out)
    grads = cuda_fused.backward(grad_output, value, ss, lsi, ref, offsets, logits, module=mod)
    want = ms_deform_attn_composed(value.double(), ss, lsi, ref.double(), offsets.double(), logits.double())
    assert torch.equal(torch.isfinite(out[0, 0]), torch.isfinite(want[0, 0])) and torch.isfinite(out[0, 0]).all()
    assert out[0, 0].abs().max() == 0
    for name, grad in zip(("grad_value", "grad_offsets", "grad_logits"), grads):
        rows = grad[:, 1:] if name == "grad_value" else grad[0, 0]  # value row 0 is where inf sits
        assert torch.isfinite(rows).all(), name


def test_empty_inputs():
    mod = module("sm_90")
    value, ss, lsi, ref, offsets, logits = inputs(torch.float32, 2, Lq=0)
    assert cuda_fused.forward(value, ss, lsi, ref, offsets, logits, module=mod).shape == (2, 0, 16)
    grads = cuda_fused.backward(value.new_empty(2, 0, 16), value, ss, lsi, ref, offsets, logits, module=mod)
    assert grads[0].abs().max() == 0 and grads[1].shape == offsets.shape


@pytest.mark.parametrize(
    ("edits", "caught_in"),
    [
        # The owner sums only its own lane's partial dots instead of the group's.
        ({"for (int src = 0; src < G; ++src) {": "for (int src = 0; src < 1; ++src) {"}, "grad_offsets"),
        # Aggregated atomics accumulate into the buffer the other lanes are still reading.
        (
            {
                "if (same) sum[c] += other;": "if (same) add[c] += other;",
                "atomic_add_chunk<A, CPT, kVec>(p, n, sum);": "atomic_add_chunk<A, CPT, kVec>(p, n, add);",
            },
            "grad_value",
        ),
    ],
)
def test_a_broken_kernel_is_caught(tmp_path, edits, caught_in):
    text = cuda_fused.SOURCE.read_text()
    for original, broken in edits.items():
        assert text.count(original) == 1, original
        text = text.replace(original, broken)
    source = tmp_path / "ms_deform_attn_fused.cu"
    source.write_text(text)
    results = run_and_compare(module("sm_90", source), torch.float32, 4, collide=True)
    assert not results[caught_in][0], f"the broken kernel passed: {results}"


BARRIER = re.compile(r"\b(__syncwarp\(mask\)|__syncthreads\(\));")


def barrier_mutant(source: Path, tmp_path: Path) -> tuple[Path, int]:
    """``source`` with every barrier call site k made ``if (msda_skip_barrier != k) barrier;``: one build
    holds all the single-barrier deletions, picked at run time. Returns (mutant, number of sites)."""
    sites = iter(range(1000))
    text = BARRIER.sub(lambda m: f"if (msda_skip_barrier != {next(sites)}) {m.group(1)};", source.read_text())
    mutant = tmp_path / source.name
    mutant.write_text('extern "C" { int msda_skip_barrier = -1; }\n' + text)
    return mutant, next(sites)


@pytest.mark.parametrize(
    ("source", "names", "check"),
    [
        (cuda_fused.SOURCE, [n for n in cuda_fused.KERNEL_NAMES if "<float," in n], "fused"),
        (cuda_unfused.SOURCE, [n for n in cuda_unfused.KERNEL_NAMES if "<float," in n], "unfused"),
    ],
    ids=["fused", "unfused"],
)
def test_deleting_any_barrier_fails_the_emulated_cases(tmp_path, source, names, check):
    """Each __syncwarp / __syncthreads of the kernel, left out alone, is caught (the race check, or a
    wrong value where the barrier orders global memory); with all of them in place the cases pass."""
    for path in source.parent.glob("*.h"):  # the mutant's includes
        (tmp_path / path.name).write_text(path.read_text())
    mutant, n_sites = barrier_mutant(source, tmp_path)
    mod = emulation.build_module(mutant, names, arch="sm_90", optimize=False)
    skip = ctypes.c_int.in_dll(mod._lib, "msda_skip_barrier")
    # G = 16 lanes, L*P = 27 points: two forward tiles of 16; backward tiles of 8, the last starting at
    # point 24, whose owner (lane 0) and softmax reader (lane 8) differ.
    shape = dict(D=64, Lq=3, N=2, P=9) if check == "fused" else {}

    def passes() -> bool:
        try:
            if check == "fused":
                return all(ok for ok, _ in run_and_compare(mod, torch.float32, 2, **shape).values())
            return emulated_cases.check_case(mod, emulated_cases.Case("float32 D=8")) is None
        except emulation.EmulationError:
            return False

    assert n_sites == (6 if check == "fused" else 1) and passes()
    caught = []
    for site in range(n_sites):
        skip.value = site
        caught.append(not passes())
    skip.value = -1
    assert all(caught), f"barrier sites left out without a failure: {[i for i, c in enumerate(caught) if not c]}"


@pytest.mark.slow
def test_address_sanitizer_build():
    """The same comparisons under AddressSanitizer and UBSan (in a subprocess: the library needs
    libasan preloaded): every load, clamped neighbour rows included, stays inside its tensor."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = {[str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]!r}
        import torch
        import test_fused_emulated as t
        from ops.cuda import emulation
        for arch in t.ARCHS:
            mod = emulation.build_module(t.cuda_fused.SOURCE, t.cuda_fused.KERNEL_NAMES, arch=arch, sanitize=True)
            t.assert_all_close(t.run_and_compare(mod, torch.float32, 4, collide=True))
            t.assert_all_close(t.run_and_compare(mod, torch.bfloat16, 2))
        t.assert_all_close(t.run_and_compare(mod, torch.float16, 4, D=30, P=7))
        print("sanitized runs passed")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=emulation.asan_environment(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and "sanitized runs passed" in proc.stdout, proc.stdout + proc.stderr[-4000:]
