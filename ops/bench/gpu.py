"""GPU check and benchmark of the CUDA MSDeformAttn kernels: ``python -m ops.bench.gpu [--json PATH]``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Checks (PASS/FAIL/SKIP lines, exit code 1 on any FAIL; SKIP when the machine cannot run a check):
the CUDA op against the float64 PyTorch reference (output and the gradients of value, sampling
locations and attention weights) over awkward D, gradcheck in float64, int64 indexing past 2**31
elements, CUDA-graph capture, torch.compile with fullgraph=True, a non-default stream and a second
GPU. Then times forward, backward and forward+backward at the encoder and decoder shapes of
Deformable DETR against the reference and against the memory-traffic floor, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import ops
from ops.bench.common import (
    DECODER_QUERIES,
    ENCODER_S,
    ENCODER_SHAPES,
    HEAD_DIM,
    N_HEADS,
    N_POINTS,
    SKIP,
    SMALL_SHAPES,
    TOLERANCES,
    Report,
    check_graph_replay,
    copy_bandwidth,
    markdown_table,
    rel_err,
    timed_rows,
)
from ops.bench.gpu_fused import evaluate_fused_targets, run_fused_benchmark, run_fused_checks
from ops.cuda import unfused as cuda_unfused
from ops.reference import ms_deform_attn_reference

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(
    N: int,
    Lq: int,
    M: int,
    D: int,
    shapes: list[list[int]],
    P: int,
    dtype: torch.dtype,
    device: torch.device | str,
    realistic: bool = False,
    value_offset: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random op inputs (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    realistic: locations are a reference point per query plus Gaussian offsets of ~2 pixels of each
        level, as in a trained encoder/decoder (nearby queries read nearby values); otherwise
        uniform over [-0.1, 1.1], which also covers the borders and the outside.
    value_offset: start value this many elements into its storage, so it is not 16-byte aligned
        (ops.cuda.unfused copies it aligned so that the vector kernel still runs).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    coord_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    storage = torch.randn(N * S * M * D + value_offset, generator=gen, device=device, dtype=torch.float32)
    value = storage.to(dtype)[value_offset:].view(N, S, M, D)
    if realistic:
        if Lq == S:  # encoder: every value position queries, around its own (x, y)
            centres = []
            for h, w in shapes:
                ys = (torch.arange(h, device=device) + 0.5) / h
                xs = (torch.arange(w, device=device) + 0.5) / w
                ys, xs = torch.meshgrid(ys, xs, indexing="ij")
                centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
            ref = torch.cat(centres).expand(N, Lq, 2)
        else:  # decoder: queries anywhere
            ref = torch.rand(N, Lq, 2, generator=gen, device=device)
        size_wh = spatial_shapes.flip(-1).to(torch.float32)  # (L, 2) as (W, H)
        offsets = 2.0 * torch.randn(N, Lq, M, L, P, 2, generator=gen, device=device)  # pixels
        loc = ref[:, :, None, None, None, :] + offsets / size_wh[None, None, None, :, None, :]
    else:
        loc = torch.rand(N, Lq, M, L, P, 2, generator=gen, device=device) * 1.2 - 0.1
    logits = torch.randn(N, Lq, M, L * P, generator=gen, device=device)
    attn = logits.softmax(-1).view(N, Lq, M, L, P)
    return value, spatial_shapes, level_start_index, loc.to(coord_dtype), attn.to(coord_dtype)


def _grads(fn, value, spatial_shapes, level_start_index, loc, attn, grad_out):
    inputs = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return (out.detach(), *grads)


def compare_to_reference(inputs: tuple[torch.Tensor, ...], tol: float, seed: int = 1) -> tuple[bool, str]:
    """ops.ms_deform_attn (CUDA) vs the float64 reference on the same inputs: output and 3 gradients."""
    value, spatial_shapes, level_start_index, loc, attn = inputs
    N, _, M, D = value.shape
    Lq = loc.shape[1]
    gen = torch.Generator(device=value.device).manual_seed(seed)
    grad_out = torch.randn(N, Lq, M * D, generator=gen, device=value.device).to(value.dtype)
    got = _grads(ops.ms_deform_attn, value, spatial_shapes, level_start_index, loc, attn, grad_out)
    f64 = [t.double() for t in (value, loc, attn, grad_out)]
    want = _grads(ms_deform_attn_reference, f64[0], spatial_shapes, level_start_index, f64[1], f64[2], f64[3])
    errors = {name: rel_err(g, w) for name, g, w in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want)}
    dtypes_ok = got[0].dtype == value.dtype and got[1].dtype == value.dtype and got[2].dtype == loc.dtype
    ok = dtypes_ok and all(e <= tol for e in errors.values())
    detail = " ".join(f"{k}={v:.1e}" for k, v in errors.items()) + f" (tol {tol:.0e})"
    return ok, detail if dtypes_ok else detail + f" wrong dtypes {[g.dtype for g in got]}"


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def run_checks(report: Report, device: torch.device) -> None:
    # First, while no float16 kernel has run yet in this process.
    report.run_check("CUDA graph capture of kernels never launched before", lambda: _capture_first_launch(device))
    shapes = [[12, 17], [6, 9], [3, 5], [1, 2]]
    for D in (1, 3, 8, 30, 32, 71):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            inputs = make_inputs(2, 37, 3, D, shapes, 3, dtype, device, seed=D)
            tol = TOLERANCES[dtype]
            report.run_check(f"vs reference D={D} {str(dtype)[6:]}", lambda: compare_to_reference(inputs, tol))
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(2, 37, 3, 32, shapes, 3, dtype, device, value_offset=1)
        tol = TOLERANCES[dtype]
        report.run_check(
            f"vs reference unaligned value (aligned copy) {str(dtype)[6:]}", lambda: compare_to_reference(inputs, tol)
        )
    inputs = make_inputs(1, 40, 2, 300, [[5, 7], [2, 3]], 2, torch.float32, device)  # 75 chunks > 32 lanes
    report.run_check("vs reference D=300 float32 (several chunks per lane)", lambda: compare_to_reference(inputs, 1e-4))
    inputs = make_inputs(2, 19, 3, 30, shapes, 4, torch.float64, device)
    report.run_check("vs reference float64", lambda: compare_to_reference(inputs, TOLERANCES[torch.float64]))
    report.run_check("gradcheck float64", lambda: _gradcheck(device))
    report.run_check("int64 indexing (value > 2**31 elements)", lambda: _large_index(device))
    report.run_check("non-default stream", lambda: _side_stream(device))
    report.run_check("CUDA graph capture (forward + backward)", lambda: _cuda_graph(device))
    report.run_check("use_deterministic_algorithms(True) raises in backward", lambda: _deterministic(device))
    report.run_check("torch.compile(fullgraph=True) forward + backward", lambda: _compile(device))
    if torch.cuda.device_count() > 1:
        report.run_check("second GPU (cuda:1 while cuda:0 is current)", lambda: _second_gpu())
    else:
        report.check("second GPU (cuda:1 while cuda:0 is current)", SKIP, "only one CUDA device")


def _gradcheck(device: torch.device) -> tuple[bool, str]:
    inputs = make_inputs(1, 3, 2, 3, [[3, 4], [2, 2]], 2, torch.float64, device)
    value, spatial_shapes, level_start_index, loc, attn = inputs
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))

    def fn(v, l, a):
        return ops.ms_deform_attn(v, spatial_shapes, level_start_index, l, a)

    # The backward adds into grad_value with atomics, in no fixed order: two backwards may differ in the
    # last bits, which gradcheck's reentrancy test rejects unless nondet_tol allows it.
    ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=1e-12, raise_exception=False)
    return ok, "N=1 Lq=3 M=2 D=3 L=2 P=2"


def _large_index(device: torch.device) -> tuple[bool | str, str]:
    # Two batch elements of 1.2e9 elements each: batch 1 straddles element 2**31, so about a fifth
    # of its samples read value, and add to the grad_value workspace, past a 32-bit index.
    M, D, H, W = 8, 32, 2048, 2300
    free, _ = torch.cuda.mem_get_info(device)
    if free < 48 * 2**30:
        return SKIP, f"needs ~48 GiB free, {free / 2**30:.0f} GiB free"
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(2, 64, M, D, [[H, W]], 4, torch.bfloat16, device)
    assert value[0].numel() < 2**31 < value.numel()
    grad_out = torch.randn(2, 64, M * D, device=device).to(torch.bfloat16)
    got = _grads(ops.ms_deform_attn, value, spatial_shapes, level_start_index, loc, attn, grad_out)
    got = [g[1:] for g in got]
    batch1 = [t[1:] for t in (value, loc, attn, grad_out)]
    want = _grads(
        ms_deform_attn_reference, batch1[0], spatial_shapes, level_start_index, batch1[1], batch1[2], batch1[3]
    )
    errors = {name: rel_err(g, w) for name, g, w in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want)}
    ok = all(e <= TOLERANCES[torch.bfloat16] for e in errors.values())
    detail = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    return ok, f"value numel {value.numel()}, batch 1 vs reference: {detail}"


def _side_stream(device: torch.device) -> tuple[bool, str]:
    inputs = make_inputs(2, 50, 4, 32, SMALL_SHAPES, 4, torch.float32, device)
    expected = ops.ms_deform_attn(*inputs)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        got = ops.ms_deform_attn(*inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    return torch.equal(got, expected), "bitwise equal to the default stream"


def _cuda_graph(device: torch.device) -> tuple[bool, str]:
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        2, 50, 4, 32, SMALL_SHAPES, 4, torch.float32, device
    )
    static = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    grad_out = torch.randn(2, 50, 4 * 32, device=device)

    def step():
        out = ops.ms_deform_attn(static[0], spatial_shapes, level_start_index, static[1], static[2])
        return (out, *torch.autograd.grad(out, static, grad_out))

    def new_values():
        new = make_inputs(2, 50, 4, 32, SMALL_SHAPES, 4, torch.float32, device, seed=7)
        return new[0], new[3], new[4]

    return check_graph_replay(device, step, static, new_values)


def _capture_first_launch(device: torch.device) -> tuple[bool, str]:
    """float16 with D=6 (the scalar kernels) runs nowhere else: its first launch is inside the capture,
    which works only because every kernel was loaded when the device was first probed."""
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        1, 20, 2, 6, SMALL_SHAPES, 2, torch.float16, device, seed=3
    )
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        out = cuda_unfused.forward(value, spatial_shapes, level_start_index, loc, attn)
        grads = cuda_unfused.backward(torch.ones_like(out), value, spatial_shapes, level_start_index, loc, attn)
    torch.cuda.current_stream(device).wait_stream(side)
    graph.replay()
    torch.cuda.synchronize(device)
    want = ms_deform_attn_reference(value.double(), spatial_shapes, level_start_index, loc.double(), attn.double())
    err = rel_err(out, want)
    return err <= TOLERANCES[torch.float16] and all(
        torch.isfinite(g).all() for g in grads
    ), f"replay vs reference {err:.1e}"


def _deterministic(device: torch.device) -> tuple[bool, str]:
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        1, 10, 2, 8, SMALL_SHAPES, 2, torch.float32, device
    )
    value.requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = ops.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
        out.sum().backward()
    except RuntimeError as exc:
        return "deterministic" in str(exc), str(exc).splitlines()[0][:100]
    finally:
        torch.use_deterministic_algorithms(previous)
    return False, "backward ran without raising"


def _compile(device: torch.device) -> tuple[bool, str]:
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        2, 50, 4, 32, SMALL_SHAPES, 4, torch.float32, device
    )

    def layer(value, loc, attn):
        out = ops.ms_deform_attn(value * 2.0, spatial_shapes, level_start_index, loc, attn.softmax(-1))
        return out.relu().sum()

    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
        loss = fn(*inputs)
        results.append((loss.detach(), *torch.autograd.grad(loss, inputs)))
    errors = [rel_err(c, e) for c, e in zip(results[1], results[0])]
    return max(errors) <= 1e-5, f"compiled vs eager: max err {max(errors):.1e}"


def _second_gpu() -> tuple[bool, str]:
    with torch.cuda.device(0):
        inputs = make_inputs(2, 37, 3, 32, [[12, 17], [6, 9]], 3, torch.float32, torch.device("cuda", 1))
        ok, detail = compare_to_reference(inputs, TOLERANCES[torch.float32])
        ok = ok and torch.cuda.current_device() == 0
    return ok, detail


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def floor_bytes(N: int, S: int, M: int, D: int, Lq: int, L: int, P: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes the forward and the forward+backward must move at least: inputs read once, outputs written once.
    The backward's floor is the difference."""
    es = torch.tensor([], dtype=dtype).element_size()
    value, out = N * S * M * D * es, N * Lq * M * D * es
    points = N * Lq * M * L * P * 4 * 3  # float32 (x, y) and attention weight
    forward = value + points + out
    # Backward reads grad_output, value, locations, weights; writes grad_value and both point grads.
    backward = out + value + points + value + points
    return forward, forward + backward


def run_benchmark(report: Report, device: torch.device, bandwidth: float) -> None:
    L = len(ENCODER_SHAPES)
    for name, Lq in (("encoder", ENCODER_S), ("decoder", DECODER_QUERIES)):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(2, Lq, N_HEADS, HEAD_DIM, ENCODER_SHAPES, N_POINTS, dtype, device, realistic=True)
            value, spatial_shapes, level_start_index, loc, attn = inputs
            grad_out = torch.randn(2, Lq, N_HEADS * HEAD_DIM, device=device).to(dtype)
            leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]

            def fwd_bwd(fn):
                def run():
                    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
                    torch.autograd.grad(out, leaves, grad_out)

                return run

            def bwd(fn):
                # Backward alone: one forward builds the graph, each repeat runs backward over it.
                out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
                return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

            def kernel_fwd_bwd():
                cuda_unfused.forward(*inputs)
                cuda_unfused.backward(grad_out, *inputs)

            # path -> (forward, a maker of the backward-only callable, forward+backward)
            paths = {
                "reference": (
                    lambda: ms_deform_attn_reference(*inputs),
                    lambda: bwd(ms_deform_attn_reference),
                    fwd_bwd(ms_deform_attn_reference),
                ),
                "ops.ms_deform_attn": (
                    lambda: ops.ms_deform_attn(*inputs),
                    lambda: bwd(ops.ms_deform_attn),
                    fwd_bwd(ops.ms_deform_attn),
                ),
                "kernel only": (
                    lambda: cuda_unfused.forward(*inputs),
                    lambda: lambda: cuda_unfused.backward(grad_out, *inputs),
                    kernel_fwd_bwd,
                ),
            }
            floor = floor_bytes(2, ENCODER_S, N_HEADS, HEAD_DIM, Lq, L, N_POINTS, dtype)
            report.rows += timed_rows(f"{name} (Lq={Lq})", dtype, paths, floor, bandwidth)
            torch.cuda.empty_cache()


def _row(report: Report, shape: str, dtype: str, path: str) -> dict:
    return next(r for r in report.rows if r["shape"].startswith(shape) and r["dtype"] == dtype and r["path"] == path)


def evaluate_targets(report: Report) -> None:
    """The issue's H100 targets; informational (the exit code reflects correctness only)."""
    enc_f32 = _row(report, "encoder", "float32", "kernel only")
    enc_bf16 = _row(report, "encoder", "bfloat16", "kernel only")
    targets = [
        (
            "encoder float32 forward within 3x of the memory floor",
            enc_f32["forward_over_floor"] <= 3.0,
            f"{enc_f32['forward_over_floor']:.2f}x",
        ),
        (
            "bfloat16 faster than float32 (encoder kernel forward)",
            enc_bf16["forward_ms"] < enc_f32["forward_ms"],
            f"{enc_bf16['forward_ms']:.3f} vs {enc_f32['forward_ms']:.3f} ms",
        ),
        (
            "bfloat16 faster than float32 (encoder kernel forward+backward)",
            enc_bf16["forward_backward_ms"] < enc_f32["forward_backward_ms"],
            f"{enc_bf16['forward_backward_ms']:.3f} vs {enc_f32['forward_backward_ms']:.3f} ms",
        ),
    ]
    for row in report.rows:
        if row["path"] == "ops.ms_deform_attn":
            targets.append(
                (
                    f"{row['shape']} {row['dtype']} forward+backward >= 10x the reference",
                    row["forward_backward_speedup"] >= 10.0,
                    f"{row['forward_backward_speedup']:.1f}x",
                )
            )
    for name, met, detail in targets:
        report.targets.append({"name": name, "met": met, "detail": detail})
        print(f"TARGET {'MET' if met else 'MISSED'} {name}: {detail}")


def build_info(device: torch.device) -> tuple[bool, str]:
    """Prints NVRTC's version, a fresh (uncached) compile time for this device's architecture (the first
    call's cost; ``python -m ops build ARCH`` times the others), and the registers per thread ptxas chose
    for each kernel on this device; a check's (ok, summary)."""
    import os
    import tempfile
    import time

    from ops.cuda import build as nvrtc

    compiler = "NVRTC {}.{}".format(*nvrtc.version())
    print(compiler)
    previous = os.environ.get("MSDA_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MSDA_CACHE_DIR"] = tmp  # an empty cache: every build compiles
        try:
            arch = cuda_unfused.arch_for_capability(torch.cuda.get_device_capability(device))
            start = time.perf_counter()
            cuda_unfused.build(arch)
            seconds = time.perf_counter() - start
            print(f"NVRTC compile {arch} (16 kernels, uncached): {seconds:.2f} s")
        finally:
            if previous is None:
                del os.environ["MSDA_CACHE_DIR"]
            else:
                os.environ["MSDA_CACHE_DIR"] = previous
    module = cuda_unfused.device_module(device)
    for name in module.names:
        print(f"registers {name}: {module.registers(name)}")
    return True, f"{compiler}, {arch} compiled in {seconds:.1f} s"


def run_all_benchmarks(report: Report, device: torch.device, measured: dict) -> tuple[bool, str]:
    """The unfused and fused benchmarks against the copy-bandwidth floor, their table and targets."""
    bandwidth = copy_bandwidth(device)
    measured["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    run_benchmark(report, device, bandwidth)
    run_fused_benchmark(report, device, bandwidth)
    print()
    print(markdown_table(report.rows))
    print()
    print(
        "floor = (inputs read once + outputs written once) / copy bandwidth; speed-up vs the reference path "
        "(grid_sample); bwd = backward alone over a retained graph; "
        "sampling locations = reference point + ~2 px Gaussian offsets, N=2, M=8, D=32, L=4, P=4"
    )
    evaluate_targets(report)
    evaluate_fused_targets(report)
    return True, f"{len(report.rows)} rows; copy bandwidth {bandwidth / 1e9:.0f} GB/s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ops.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="also write the checks, rows and targets to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the checks and the benchmark; 0 when every check passed, 1 otherwise, 2 without a GPU."""
    json_path = parse_args(argv).json
    if not torch.cuda.is_available():
        print("No CUDA device: this benchmark needs a GPU (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    ok, reason = cuda_unfused.is_available()
    if not ok:
        print(f"The CUDA kernel is unavailable on this machine: {reason}", file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    print(f"device: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, ops {ops.__version__}")
    previous_backend = ops.get_backend()
    ops.set_backend("cuda")  # the op must run the kernel, never fall back silently
    report, measured = Report(), {}
    try:
        report.run_check("NVRTC compile and registers", lambda: build_info(device))
        run_checks(report, device)
        run_fused_checks(report, device)
        # A crash in the timing (out of memory, say) is one FAIL line; the checks above stay recorded.
        report.run_check("benchmark", lambda: run_all_benchmarks(report, device, measured))
    finally:
        ops.set_backend(previous_backend)
        if json_path:  # whatever ran, also when a check or the benchmark crashed
            result = {"device": props.name, "torch": torch.__version__, **measured}
            result.update(checks=report.checks, rows=report.rows, targets=report.targets)
            with open(json_path, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {json_path}")
    skipped = sum(c["status"] == SKIP for c in report.checks)
    print("FAILED" if report.failed else "ALL CHECKS PASSED" + (f" ({skipped} skipped)" if skipped else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
