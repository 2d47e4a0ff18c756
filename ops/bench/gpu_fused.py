"""GPU checks and timings of the fused op, run by ``python -m ops.bench.gpu`` after the unfused ones.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Checks: ``ops.ms_deform_attn_fused`` (the fused CUDA kernel) against the float64 composition (softmax,
locations, reference op) for every dtype and both reference forms, gradients of all raw inputs,
CUDA-graph capture. Timings at the encoder and decoder shapes of Deformable DETR: the layer as it was
(PyTorch softmax and location arithmetic, then the unfused kernel), the fused op, the fused kernel
alone (with and without aggregated atomics), and the reference path, against the fused op's
memory-traffic floor measured with the copy bandwidth of the same run.
"""

from __future__ import annotations

import torch

from ops.bench.common import (
    DECODER_QUERIES,
    ENCODER_S,
    ENCODER_SHAPES,
    HEAD_DIM,
    N_HEADS,
    N_POINTS,
    TOLERANCES,
    Report,
    check_graph_replay,
    rel_err,
    timed_rows,
)
from ops.cuda import fused as cuda_fused
from ops.fused import ms_deform_attn_composed, ms_deform_attn_fused
from ops.reference import ms_deform_attn_reference


def fused_inputs(N, Lq, M, D, shapes, P, dtype, device, ref_dim=2, seed=0):
    """(value, spatial_shapes, level_start_index, reference_points, offsets, logits) as a trained
    layer sees them: encoder queries at their own pixel (decoder ones anywhere), offsets of ~2 pixels."""
    gen = torch.Generator(device=device).manual_seed(seed)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=gen, device=device).to(dtype)
    if Lq == S:
        centres = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w, indexing="ij"
            )
            centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(centres)[None, :, None, :].expand(N, Lq, L, 2)
    else:
        ref = torch.rand(N, Lq, 1, 2, generator=gen, device=device).expand(N, Lq, L, 2)
    if ref_dim == 4:
        sizes = torch.rand(N, Lq, 1, 2, generator=gen, device=device) * 0.3 + 0.02
        ref = torch.cat([ref, sizes.expand(N, Lq, L, 2)], -1)
    offsets = 2.0 * torch.randn(N, Lq, M, L, P, 2, generator=gen, device=device)
    logits = torch.randn(N, Lq, M, L, P, generator=gen, device=device)
    return value, spatial_shapes, level_start_index, ref.contiguous().to(coord), offsets.to(coord), logits.to(coord)


def _value_and_grads(fn, inputs, grad_out):
    value, ss, lsi, ref, offsets, logits = inputs
    leaves = [t.detach().requires_grad_(True) for t in (value, ref, offsets, logits)]
    out = fn(leaves[0], ss, lsi, leaves[1], leaves[2], leaves[3])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def compare_fused(inputs, tol: float) -> tuple[bool, str]:
    """The fused op on the GPU vs the float64 composition: output and the gradients of the 4 raw inputs."""
    value, ss, lsi, ref, offsets, logits = inputs
    N, _, M, D = value.shape
    grad_out = torch.randn(N, offsets.shape[1], M * D, device=value.device).to(value.dtype)
    got = _value_and_grads(ms_deform_attn_fused, inputs, grad_out)
    f64 = (value.double(), ss, lsi, ref.double(), offsets.double(), logits.double())
    want = _value_and_grads(ms_deform_attn_composed, f64, grad_out.double())
    names = ("out", "grad_value", "grad_ref", "grad_offsets", "grad_logits")
    errors = {n: rel_err(g, w) for n, g, w in zip(names, got, want)}
    return all(e <= tol for e in errors.values()), " ".join(f"{k}={v:.1e}" for k, v in errors.items())


def run_fused_checks(report: Report, device: torch.device) -> None:
    shapes = [[12, 17], [6, 9], [3, 5], [1, 2]]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for ref_dim in (2, 4):
            for D in (32, 30):
                inputs = fused_inputs(2, 37, 3, D, shapes, 3, dtype, device, ref_dim=ref_dim, seed=D)
                name = f"fused vs composition D={D} {str(dtype)[6:]} {'boxes' if ref_dim == 4 else 'points'}"
                report.run_check(name, lambda: compare_fused(inputs, TOLERANCES[dtype]))
    report.run_check("fused CUDA graph capture (forward + backward)", lambda: _fused_graph(device))


def _fused_graph(device: torch.device) -> tuple[bool, str]:
    inputs = fused_inputs(2, 50, 4, 32, [[10, 12], [5, 6]], 4, torch.float32, device)
    value, ss, lsi, ref, offsets, logits = inputs
    static = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
    grad_out = torch.randn(2, 50, 4 * 32, device=device)

    def step():
        out = ms_deform_attn_fused(static[0], ss, lsi, ref, static[1], static[2])
        return (out, *torch.autograd.grad(out, static, grad_out))

    def new_values():
        new = fused_inputs(2, 50, 4, 32, [[10, 12], [5, 6]], 4, torch.float32, device, seed=7)
        return new[0], new[4], new[5]

    return check_graph_replay(device, step, static, new_values)


def fused_floor_bytes(N, S, M, D, Lq, L, P, dtype) -> tuple[int, int]:
    """Bytes the fused forward and forward+backward must move at least: value, offsets, logits and
    reference points read once, outputs (and gradients) written once."""
    es = torch.tensor([], dtype=dtype).element_size()
    value, out = N * S * M * D * es, N * Lq * M * D * es
    points = N * Lq * M * L * P * 4 * 3  # float32 offsets (x, y) and logit
    ref = N * Lq * L * 2 * 4
    forward = value + points + ref + out
    backward = out + value + points + ref + value + points  # + grad_value, grad offsets and logits
    return forward, forward + backward


def _reference_layer(value, ss, lsi, ref, offsets, logits):
    """Softmax and locations in PyTorch, then the grid_sample reference: the path without the kernel."""
    from ops.fused import attention_weights_of, sampling_locations_of

    return ms_deform_attn_reference(
        value, ss, lsi, sampling_locations_of(ref, offsets, ss), attention_weights_of(logits)
    )


def run_fused_benchmark(report: Report, device: torch.device, bandwidth: float) -> None:
    L = len(ENCODER_SHAPES)
    for shape, Lq in (("encoder", ENCODER_S), ("decoder", DECODER_QUERIES)):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = fused_inputs(2, Lq, N_HEADS, HEAD_DIM, ENCODER_SHAPES, N_POINTS, dtype, device)
            value, ss, lsi, ref, offsets, logits = inputs
            grad_out = torch.randn(2, Lq, N_HEADS * HEAD_DIM, device=device).to(dtype)
            leaves = [t.detach().requires_grad_(True) for t in (value, offsets, logits)]

            def layer(fn):
                return lambda: fn(leaves[0], ss, lsi, ref, leaves[1], leaves[2])

            def fwd_bwd(fn):
                return lambda: torch.autograd.grad(layer(fn)(), leaves, grad_out)

            def bwd(fn):
                out = layer(fn)()
                return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

            def kernel_bwd(aggregate):
                def run():
                    previous = cuda_fused.AGGREGATE_ATOMICS
                    cuda_fused.AGGREGATE_ATOMICS = aggregate
                    try:
                        cuda_fused.backward(grad_out, *inputs)
                    finally:
                        cuda_fused.AGGREGATE_ATOMICS = previous

                return run

            def kernel_fwd_bwd(aggregate):
                return lambda: (cuda_fused.forward(*inputs), kernel_bwd(aggregate)())

            paths = {
                "reference (PyTorch softmax, locations, grid_sample)": (
                    layer(_reference_layer),
                    lambda: bwd(_reference_layer),
                    fwd_bwd(_reference_layer),
                ),
                "unfused (PyTorch softmax and locations + kernel)": (
                    layer(ms_deform_attn_composed),
                    lambda: bwd(ms_deform_attn_composed),
                    fwd_bwd(ms_deform_attn_composed),
                ),
                "ops.ms_deform_attn_fused": (
                    layer(ms_deform_attn_fused),
                    lambda: bwd(ms_deform_attn_fused),
                    fwd_bwd(ms_deform_attn_fused),
                ),
                "fused kernel only": (
                    lambda: cuda_fused.forward(*inputs),
                    lambda: kernel_bwd(True),
                    kernel_fwd_bwd(True),
                ),
                "fused kernel only, atomics not aggregated": (
                    lambda: cuda_fused.forward(*inputs),
                    lambda: kernel_bwd(False),
                    kernel_fwd_bwd(False),
                ),
            }
            floor = fused_floor_bytes(2, ENCODER_S, N_HEADS, HEAD_DIM, Lq, L, N_POINTS, dtype)
            report.rows += timed_rows(f"{shape} (Lq={Lq})", dtype, paths, floor, bandwidth)
            torch.cuda.empty_cache()


def evaluate_fused_targets(report: Report) -> None:
    """The fused-kernel issue's targets; informational like the others."""

    def row(shape, dtype, path):
        return next(
            r for r in report.rows if r["shape"].startswith(shape) and r["dtype"] == dtype and r["path"] == path
        )

    targets = []
    for dtype, bound in (("bfloat16", 2.0), ("float32", 2.5)):
        r = row("encoder", dtype, "fused kernel only")
        targets.append(
            (
                f"encoder {dtype} fused forward within {bound}x of the floor",
                r["forward_over_floor"] <= bound,
                f"{r['forward_over_floor']:.2f}x",
            )
        )
    for shape in ("encoder", "decoder"):
        for dtype in ("float32", "bfloat16"):
            fused = row(shape, dtype, "ops.ms_deform_attn_fused")
            unfused = row(shape, dtype, "unfused (PyTorch softmax and locations + kernel)")
            targets.append(
                (
                    f"{shape} {dtype} fused forward+backward >= 10x the reference",
                    fused["forward_backward_speedup"] >= 10,
                    f"{fused['forward_backward_speedup']:.1f}x",
                )
            )
            for step in ("forward", "forward_backward"):
                ratio = unfused[f"{step}_ms"] / fused[f"{step}_ms"]
                targets.append(
                    (
                        f"{shape} {dtype} fused layer {step.replace('_', '+')} >= 1.5x the unfused layer",
                        ratio >= 1.5,
                        f"{ratio:.2f}x",
                    )
                )
    for name, met, detail in targets:
        report.targets.append({"name": name, "met": met, "detail": detail})
        print(f"TARGET {'MET' if met else 'MISSED'} {name}: {detail}")
