"""CPU speed of the op, C++ kernel against the reference path, measured in one run: ``python -m ops.bench.cpu``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Three paths, timed in turn within each repetition (so a busy machine slows them alike) and
reported as medians with ratios against the first:

- ``before``: the path this kernel replaces: the custom op around the PyTorch reference, whose
  backward re-ran the forward through torch.func.vjp, and (in the model benchmark) frozen batch norm
  as a multiply and an add;
- ``reference``: today's fallback: the reference under plain autograd, one-pass frozen batch norm;
- ``kernel``: the C++ CPU kernel, one-pass frozen batch norm.

The op's forward, and forward + backward, at the encoder's shape for an input image of ``--op-size``
(default 512x683). ``bench/cpu_kernel.py`` times the whole model and training step the same way::

    python -m ops.bench.cpu [--reps 5] [--threads T] [--batch-size 1] [--op-size 512x683]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import ops
from ops import functional
from ops.cpu import build as cpu_build

PATHS = ("before", "reference", "kernel")


def encoder_shapes(height: int, width: int, n_levels: int = 4) -> list[tuple[int, int]]:
    """(H, W) of the encoder's levels for an input image: strides 8, 16, 32 (ResNet C3-C5) and 64."""
    shapes = [(math.ceil(height / 8), math.ceil(width / 8))]
    while len(shapes) < n_levels:  # each further level halves with a stride-2 convolution (ceil)
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


@contextlib.contextmanager
def use_path(name: str, frozen_bn_class: type | None = None) -> Iterator[None]:
    """Run the op (and frozen batch norm, when its class is given) the way path ``name`` does."""
    saved_use_kernel = functional.use_kernel
    saved_bn = frozen_bn_class.forward if frozen_bn_class is not None else None
    try:
        if name == "before":
            ops.set_backend("reference")
            # Through the custom op even without a kernel: its CPU kernel then runs the reference,
            # and its backward the torch.func.vjp recomputation, as before this kernel.
            functional.use_kernel = lambda device: True
            if frozen_bn_class is not None:
                frozen_bn_class.forward = _two_pass_frozen_bn
        else:
            ops.set_backend("reference" if name == "reference" else "cpu")
        yield
    finally:
        ops.set_backend(None)
        functional.use_kernel = saved_use_kernel
        if frozen_bn_class is not None:
            frozen_bn_class.forward = saved_bn


def _two_pass_frozen_bn(self, x: torch.Tensor) -> torch.Tensor:
    """FrozenBatchNorm2d.forward as it was: a multiply and an add, two passes over x."""
    scale = self.weight * (self.running_var + self.eps).rsqrt()
    shift = self.bias - self.running_mean * scale
    return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


def time_paths(
    fns: dict[str, Callable[[], object]], reps: int, frozen_bn_class: type | None = None
) -> dict[str, float]:
    """Median seconds per call of each path's fn, the paths taking turns within each repetition (one untimed warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            with use_path(name, frozen_bn_class):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            if rep > 0:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    base = medians["before"]
    cells = [f"{name} {medians[name] * 1e3:9.1f} ms (x{base / medians[name]:5.2f})" for name in PATHS]
    print(f"{title:<34} " + "   ".join(cells), flush=True)


def op_inputs(height: int, width: int, batch_size: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """Encoder self-attention inputs of the paper's model (M=8, D=32, L=4, P=4): every position queries.

    Locations as the model makes them: around each query's own position, on every level, at offsets of
    (p+1) pixels along a direction per head (the sampling_offsets initialization) plus noise of 2 pixels.
    """
    M, D, P = 8, 32, 4
    shapes = encoder_shapes(height, width)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    g = torch.Generator().manual_seed(0)
    value = torch.randn(batch_size, S, M, D, generator=g)
    # (S, 2) normalized (x, y) centre of every position of every level
    ref = torch.cat(
        [
            torch.stack(
                torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1
            ).reshape(h * w, 2)
            for h, w in shapes
        ]
    )
    angles = torch.arange(M) * (2 * math.pi / M)
    directions = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
    pixels = directions[:, None, None, :] * torch.arange(1, P + 1).view(1, 1, P, 1)  # (M, 1, P, 2)
    pixels = pixels + 2 * torch.randn(batch_size, S, M, L, P, 2, generator=g)
    level_wh = spatial_shapes.flip(1).to(torch.float32).view(1, 1, 1, L, 1, 2)  # (W, H) per level
    loc = ref.view(1, S, 1, 1, 1, 2) + pixels / level_wh
    attn = torch.rand(batch_size, S, M, L * P, generator=g).softmax(-1).view(batch_size, S, M, L, P)
    for t in (value, loc, attn):
        t.requires_grad_(requires_grad)
    return value, spatial_shapes, level_start_index, loc, attn


def bench_op(height: int, width: int, batch_size: int, reps: int) -> None:
    value, ss, lsi, loc, attn = op_inputs(height, width, batch_size, requires_grad=True)
    N, S, M, D = value.shape
    print(f"op at {height}x{width}: N={N} S=Lq={S} M={M} D={D} L={ss.shape[0]} P={loc.shape[4]}", flush=True)

    def forward() -> None:
        with torch.no_grad():
            ops.ms_deform_attn(value, ss, lsi, loc, attn)

    grad_out = torch.randn(N, S, M * D, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        out = ops.ms_deform_attn(value, ss, lsi, loc, attn)
        torch.autograd.grad(out, (value, loc, attn), grad_out)

    report("  op forward", time_paths({p: forward for p in PATHS}, reps))
    report("  op forward + backward", time_paths({p: forward_backward for p in PATHS}, reps))


def size(text: str) -> tuple[int, int]:
    """``HxW`` -> (H, W), for argparse."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 512x683 (HxW), got {text!r}") from None
    return height, width


def prepare(threads: int | None) -> None:
    """Set the thread count, check that the kernel builds, print the machine line."""
    if threads:
        torch.set_num_threads(threads)
    ok, reason = cpu_build.is_available()
    if not ok:
        raise SystemExit(f"the CPU kernel is unavailable, nothing to compare: {reason}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load}; x = speed-up over 'before'",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--op-size", type=size, default=(512, 683), help="input image HxW of the encoder shape")
    args = parser.parse_args(argv)
    prepare(args.threads)
    bench_op(*args.op_size, args.batch_size, args.reps)
    print(f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
