"""The kernel executed on the CPU: ops/csrc/ms_deform_attn.cu compiled by g++ against the emulation
header and launched through the GPU's own launcher (ops.cuda.unfused), for the sm_80 and sm_90 paths.

Every case of emulated_cases.py against the float64 reference; the variant and path each input takes;
the harness's rules on small kernels of their own; an AddressSanitizer build in a subprocess; and
broken copies of the kernel, which must fail.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emulated_cases import Case, all_cases, check_case, expected, run_case

from ops.cuda import emulation
from ops.cuda import unfused as cuda_unfused
from ops.cuda.launch import KernelArgs, launch, pointer

pytestmark = pytest.mark.skipif(shutil.which(emulation.CXX) is None, reason=f"{emulation.CXX} not found")

ARCHS = ("sm_80", "sm_90")
RULES = Path(__file__).resolve().parent / "emu_rules.cu"
FLOAT_KERNELS = [n for n in cuda_unfused.KERNEL_NAMES if "<float," in n]


@pytest.fixture(scope="module", params=ARCHS)
def module(request):
    return emulation.build_module(cuda_unfused.SOURCE, cuda_unfused.KERNEL_NAMES, request.param)


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.name)
def test_case_matches_reference(module, case):
    module.launched.clear()
    assert check_case(module, case) is None
    # The kernels ran (no shortcut), exactly when there is something to write.
    expected = ["forward"] * (case.N * case.Lq * case.M * case.D > 0) + ["backward"] * (
        case.N * case.Lq * case.M * case.P > 0
    )
    assert [name.split("::")[1].split("_")[0] for name in module.launched] == expected


def test_vector_and_scalar_paths(module):
    module.counters(reset=True)
    module.launched.clear()
    run_case(module, Case("aligned", torch.float32, 32))
    run_case(module, Case("misaligned view", torch.float32, 32, offset=1))  # copied, so still vectorized
    assert module.launched == ["msda::forward_kernel<float, true>", "msda::backward_kernel<float, true>"] * 2
    counts = module.counters(reset=True)
    assert counts["vector_loads"] > 0 and counts["shuffles"] > 0 and counts["barriers"] > 0
    if module.arch == "sm_90":  # 16-byte float atomics on Hopper and later, none before
        assert counts["wide_atomics"] > 0 and counts["atomics"] == 0, counts
    else:
        assert counts["wide_atomics"] == 0 and counts["atomics"] > 0, counts
    module.launched.clear()
    run_case(module, Case("D=30", torch.bfloat16, 30))
    assert module.launched == [
        "msda::forward_kernel<__nv_bfloat16, false>",
        "msda::backward_kernel<__nv_bfloat16, false>",
    ]
    assert module.counters()["vector_loads"] == 0


def _launch_raw(module, name, value, others):
    """ops.cuda.unfused's launch with a chosen variant and a value pointer as given (no aligned copy)."""
    spatial_shapes, level_start_index, loc, attn = others
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    dims = cuda_unfused.make_dims(N, S, M, D, Lq, L, P, 4)
    output = torch.empty(N, Lq, M * D)
    tensors = [value, spatial_shapes, level_start_index, loc, attn, output]
    launch(module, value.device, name, cuda_unfused.launch_geometry(dims), tensors, dims)
    return output


def test_scalar_kernel_reads_misaligned_value_and_vector_kernel_refuses(module):
    from conftest import make_inputs

    value, *others = make_inputs([[5, 6], [2, 3]], N=1, Lq=4, M=2, D=8, P=2, dtype=torch.float32)
    storage = torch.empty(value.numel() + 1)
    shifted = storage[1:].view(value.shape).copy_(value)
    assert shifted.data_ptr() % 16 != 0
    want = cuda_unfused.forward(value, *others, module=module)
    got = _launch_raw(module, "msda::forward_kernel<float, false>", shifted, others)
    assert torch.equal(got, want)
    with pytest.raises(emulation.EmulationError, match="not 16-byte aligned"):
        _launch_raw(module, "msda::forward_kernel<float, true>", shifted, others)


def test_argument_sizes_are_checked(module):
    args = KernelArgs([pointer(None)] * 6 + [ctypes.c_int(0)])  # an int where Dims goes
    with pytest.raises(emulation.EmulationError, match=r"argument 6 is \d+ bytes, the caller passed 4"):
        module.launch("msda::forward_kernel<float, true>", (1, 1, 1), (256, 1, 1), 0, args)
    with pytest.raises(emulation.EmulationError, match="no kernel named"):
        module.launch("msda::forward_kernel<int, true>", (1, 1, 1), (256, 1, 1), 0, args)


def test_no_grad_value_skips_the_atomics(module):
    from conftest import make_inputs

    inputs = make_inputs([[5, 6], [2, 3]], N=1, Lq=4, M=2, D=8, P=2, dtype=torch.float32)
    grad_out = torch.randn(1, 4, 16)
    full = cuda_unfused.backward(grad_out, *inputs, module=module)
    module.counters(reset=True)
    partial = cuda_unfused.backward(grad_out, *inputs, need_grad_value=False, module=module)
    counts = module.counters()
    assert partial[0].numel() == 0 and counts["atomics"] == counts["wide_atomics"] == 0
    assert torch.equal(partial[1], full[1]) and torch.equal(partial[2], full[2])


def _inf_value_under_outside_neighbours(module) -> str | None:
    """value[0, 0] = inf (row 0, onto which a neighbour outside the map would clamp) and every point of
    query 0 far outside the map. None when, as in the reference, query 0's output and point gradients
    are 0 and grad_value is finite; else what differed."""
    from conftest import make_inputs

    value, *others = make_inputs([[5, 6], [2, 3]], N=1, Lq=2, M=2, D=8, P=2, dtype=torch.float32)
    value[0, 0] = math.inf
    others[2][0, 0] = -1e3  # sampling_locations (N, Lq, M, L, P, 2): all of query 0's
    grad_out = torch.ones(1, 2, 16)
    out = cuda_unfused.forward(value, *others, module=module)
    grad_value, grad_loc, grad_attn = cuda_unfused.backward(grad_out, value, *others, module=module)
    want_out, _, want_loc, want_attn = expected(value, *others, grad_out)
    for name, got, want in (
        ("output", out[0, 0], want_out[0, 0]),
        ("grad_loc", grad_loc[0, 0], want_loc[0, 0]),
        ("grad_attn", grad_attn[0, 0], want_attn[0, 0]),
    ):
        if not torch.equal(got.double(), want) or want.abs().max() != 0:
            return f"query 0's {name}: {got.flatten()[:6].tolist()}, the reference's {want.flatten()[:6].tolist()}"
    if not torch.isfinite(grad_value).all():
        return "grad_value is not finite"
    return None


def test_an_infinite_value_under_neighbours_outside_the_map_reads_zero_both_directions(module):
    """A neighbour outside the map is skipped, never read with weight 0 (0 * inf = NaN where the reference
    reads 0), in the forward and the backward kernel."""
    assert _inf_value_under_outside_neighbours(module) is None


def test_more_levels_than_shared_memory_holds_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 4096 levels.*L=4097"):
        cuda_unfused.make_dims(1, 4097, 1, 4, 1, 4097, 1, 4)


# ---------------------------------------------------------------------------------------------
# The harness's own rules, on small kernels
# ---------------------------------------------------------------------------------------------

RULE_KERNELS = [
    "rules::butterfly",
    "rules::shuffles",
    "rules::reverse",
    "rules::caller_outside_mask",
    "rules::named_lane_exited",
    "rules::different_shuffles",
    "rules::divergent_barrier",
    "rules::exit_before_barrier",
    "rules::vector_copy",
    "rules::scalar_atomics",
    "rules::vector_atomics",
    "rules::convert",
    "rules::swap_pairs",
    "rules::syncwarp_outside_mask",
    "rules::syncwarp_lane_exited",
]


@pytest.fixture(scope="module")
def rules():
    return emulation.build_module(RULES, RULE_KERNELS, "sm_90")


def _run(module, name, tensors, scalars=(), grid=1, block=32, shared=0):
    args = KernelArgs([*[pointer(t) for t in tensors], *[ctypes.c_int(s) for s in scalars]])
    module.launch(name, (grid, 1, 1), (block, 1, 1), shared, args)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_butterfly_shuffles_sum_each_group(rules, width):
    x = torch.arange(64, dtype=torch.float32)
    out = torch.empty(64)
    _run(rules, "rules::butterfly", [x, out], [width], block=64)
    assert torch.equal(out, x.view(-1, width).sum(1).repeat_interleave(width))


def test_shuffle_sources(rules):
    x = torch.arange(32, dtype=torch.float64) * 10
    down, up, idx = (
        torch.empty(32, dtype=torch.float64),
        torch.empty(32, dtype=torch.float64),
        torch.empty(32, dtype=torch.float64),
    )
    _run(rules, "rules::shuffles", [x, down, up, idx], [3])
    lanes = torch.arange(32)
    assert torch.equal(down, x[torch.where(lanes + 3 < 32, lanes + 3, lanes)])
    assert torch.equal(up, x[torch.where(lanes >= 3, lanes - 3, lanes)])
    assert torch.equal(idx, torch.full((32,), 30.0, dtype=torch.float64))


def test_shared_memory_and_barrier(rules):
    x = torch.arange(96, dtype=torch.int32)
    out = torch.empty(96, dtype=torch.int32)
    _run(rules, "rules::reverse", [x, out], grid=3, block=32, shared=32 * 4)
    assert torch.equal(out, x.view(3, 32).flip(1).reshape(-1))


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        ("rules::caller_outside_mask", r"__shfl_xor_sync on line \d+: the calling lane 1 is not in mask 0x00000001"),
        ("rules::named_lane_exited", r"lane 31 it names has exited"),
        (
            "rules::different_shuffles",
            r"waits at __shfl_xor_sync on line \d+ .* but lane 1 it names waits at __shfl_xor_sync on line",
        ),
        ("rules::divergent_barrier", r"waits at __syncthreads on line \d+ but thread 16 has exited"),
        ("rules::exit_before_barrier", r"but thread 5 has exited"),
        ("rules::syncwarp_outside_mask", r"__syncwarp on line \d+: the calling lane 1 is not in mask 0x00000001"),
        ("rules::syncwarp_lane_exited", r"waits at __syncwarp on line \d+ .* but lane 7 it names has exited"),
    ],
)
def test_broken_rules_are_reported(rules, kernel, message):
    with pytest.raises(emulation.EmulationError, match=message):
        _run(rules, kernel, [torch.zeros(32)])


def test_shared_memory_race_names_both_lines(rules):
    x, out = torch.arange(32, dtype=torch.int32), torch.empty(32, dtype=torch.int32)
    _run(rules, "rules::swap_pairs", [x, out], [1, 1, 0], shared=32 * 4)
    assert torch.equal(out, x.view(16, 2).flip(1).reshape(-1))
    write, read = [i + 1 for i, line in enumerate(RULES.read_text().splitlines()) if "slots[" in line][1:]
    # Lane 1 reads lane 0's slot, which lane 0 (scheduled first) wrote with no barrier between.
    message = rf"thread 1 reads shared byte 0 \({RULES}:{read}\), which thread 0 wrote \({RULES}:{write}\) with no"
    with pytest.raises(emulation.EmulationError, match=message):
        _run(rules, "rules::swap_pairs", [x, out], [0, 0, 1], shared=32 * 4)
    # Lane 0 reads lane 1's slot before lane 1 ran at all.
    message = rf"thread 0 reads shared byte 4 \({RULES}:{read}\), which no thread of the block has written"
    with pytest.raises(emulation.EmulationError, match=message):
        _run(rules, "rules::swap_pairs", [x, out], [0, 1, 0], shared=32 * 4)


def test_vector_accesses_must_be_aligned(rules):
    src, dst = torch.arange(132, dtype=torch.float32), torch.zeros(132)
    _run(rules, "rules::vector_copy", [src, dst], [0])
    assert torch.equal(dst[:128], src[:128])
    with pytest.raises(emulation.EmulationError, match="__ldg at 0x[0-9a-f]+ is not 16-byte aligned"):
        _run(rules, "rules::vector_copy", [src, dst], [1])
    p = torch.zeros(8)
    _run(rules, "rules::vector_atomics", [p], [4], block=2)
    assert p.tolist() == [0, 0, 0, 0, 2, 4, 6, 8]
    with pytest.raises(emulation.EmulationError, match=r"atomicAdd\(float4\*\) at .* is not 16-byte aligned"):
        _run(rules, "rules::vector_atomics", [p], [2])


def test_half_conversions_are_bit_exact():
    """Round to nearest even, as the GPU does, on random floats and on the awkward ones."""
    rules = emulation.build_module(RULES, ["rules::convert"], "sm_80")
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (40000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            1e-8,
            6e-8,
            3e-5,
            2.0**-24,
            2.0**-25,
            3.0 * 2.0**-26,
            float("inf"),
            -float("inf"),
            3.4e38,
            1.00390625,
            1.01171875,
        ]
    )
    x = torch.cat([bits.view(torch.float32), special])
    n = x.numel()
    bf16, f16 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.float16)
    bf16_back, f16_back = torch.empty(n), torch.empty(n)
    _run(rules, "rules::convert", [x, bf16, f16, bf16_back, f16_back], [n], grid=-(-n // 256), block=256)
    finite = ~torch.isnan(x)
    assert torch.equal(bf16.view(torch.int16)[finite], x.to(torch.bfloat16).view(torch.int16)[finite])
    assert torch.equal(f16.view(torch.int16)[finite], x.to(torch.float16).view(torch.int16)[finite])
    assert torch.isnan(bf16[~finite].float()).all() and torch.isnan(f16[~finite].float()).all()
    assert torch.equal(bf16_back[finite], bf16.float()[finite]) and torch.equal(f16_back[finite], f16.float()[finite])


# ---------------------------------------------------------------------------------------------
# AddressSanitizer, and broken kernels the harness must catch
# ---------------------------------------------------------------------------------------------

CASES_SCRIPT = Path(__file__).resolve().parent / "emulated_cases.py"
needs_asan = pytest.mark.skipif(
    shutil.which(emulation.CXX) is None or emulation.libasan() is None, reason="no libasan for the compiler"
)


def _run_cases_sanitized(source: Path, arch: str, names: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(CASES_SCRIPT), "--sanitize", "--arch", arch, "--source", str(source), "--names", names]
    return subprocess.run(cmd, capture_output=True, text=True, env=emulation.asan_environment(), timeout=900)


@needs_asan
def test_address_sanitizer_run_is_clean():
    proc = _run_cases_sanitized(cuda_unfused.SOURCE, "sm_90", "all")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cases passed on sm_90" in proc.stdout and "ERROR: AddressSanitizer" not in proc.stderr


def _mutant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the kernel source and the headers it includes, ``old`` replaced by ``new`` in the first
    of them (the .cu first) that contains it; returns the copied .cu."""
    folder = tmp_path / "mutant"
    folder.mkdir()
    files = [cuda_unfused.SOURCE, *sorted(cuda_unfused.SOURCE.parent.glob("*.h"))]
    target = next((f for f in files if old in f.read_text()), None)
    assert target is not None, f"neither the kernel nor its headers contain {old!r} any more: update this mutation"
    for f in files:
        text = f.read_text()
        (folder / f.name).write_text(text.replace(old, new, 1) if f == target else text)
    return folder / cuda_unfused.SOURCE.name


MUTATIONS = {
    "shuffle mask without the group's offset in the warp": (
        "((1u << group_size) - 1u) << (threadIdx.x & 31u & ~unsigned(group_size - 1))",
        "((1u << group_size) - 1u)",
    ),
    "no barrier after staging the level table": ("  }\n  __syncthreads();\n}", "  }\n}"),
    "butterfly stops one step early": ("offset > 0; offset >>= 1", "offset > 1; offset >>= 1"),
    "lane 1 stores the point gradients": ("if (lane == 0) {", "if (lane == 1) {"),
}
# Mutations that touch memory out of bounds run only in the AddressSanitizer subprocess: in this
# process they could corrupt the heap instead of failing a case.
OUT_OF_BOUNDS_MUTATIONS = {
    "neighbour test lets h0 + 1 == H through": ("bottom = h0 + 1 < H", "bottom = h0 + 1 <= H"),
    "tail chunk takes one channel too many": (
        "const int n_valid = max(0, min(CPT, d.D - c0));",
        "const int n_valid = max(0, min(CPT, d.D - c0 + 1));",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_broken_kernel_is_caught(tmp_path, mutation):
    source = _mutant(tmp_path, *MUTATIONS[mutation])
    mutant = emulation.build_module(source, FLOAT_KERNELS, "sm_80", optimize=False)
    failures = [f for f in (check_case(mutant, c) for c in all_cases() if c.dtype == torch.float32) if f]
    assert failures, f"the harness passed a kernel with: {mutation}"


@needs_asan
@pytest.mark.parametrize("mutation", list(OUT_OF_BOUNDS_MUTATIONS))
def test_off_by_one_is_caught_with_the_sanitizer(tmp_path, mutation):
    """An off-by-one bound reads or writes past a row or past a tensor: AddressSanitizer stops the
    run, or a wrong result fails a case."""
    source = _mutant(tmp_path, *OUT_OF_BOUNDS_MUTATIONS[mutation])
    proc = _run_cases_sanitized(source, "sm_80", "float")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "FAIL" in proc.stdout or "AddressSanitizer" in proc.stderr
