"""The cases the emulated kernel must pass, shared by test_emulation.py and its AddressSanitizer run.

Legend: N batch, S = sum_l H_l*W_l, M heads, D channels per head, Lq queries, L levels, P points.

Each case builds op inputs, runs ``ops.cuda.unfused.forward``/``backward`` (the GPU's launcher) on an
emulated module, and compares output and the three gradients with the float64 reference.
``python ops/tests/emulated_cases.py [--sanitize] [--arch sm_90] [--source PATH]`` runs them all
and exits 1 on any failure (the ASan build needs ``ops.cuda.emulation.asan_environment()``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_here = Path(__file__).resolve().parent
for path in (_here, _here.parents[1]):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from conftest import make_inputs  # noqa: E402

from ops.cuda import emulation  # noqa: E402
from ops.cuda import unfused as cuda_unfused  # noqa: E402
from ops.reference import ms_deform_attn_reference  # noqa: E402

# Largest |got - want| relative to max(1, max |want|) against the float64 reference fed the same
# rounded inputs: float32 differs by summation order, half types also round output and grad_value.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [[6, 7], [3, 4], [1, 2]]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Case:
    name: str
    dtype: torch.dtype = torch.float32
    D: int = 8
    N: int = 2
    Lq: int = 9
    M: int = 3
    P: int = 3
    shapes: list = field(default_factory=lambda: SHAPES)
    offset: int = 0  # start value and grad_output this many elements into their storage (misaligned view)
    special: bool = False  # NaN, inf and exact-border locations in the first query


def all_cases() -> list[Case]:
    cases = [Case(f"{str(dtype)[6:]} D={D}", dtype, D) for dtype in DTYPES for D in (1, 3, 8, 30, 32, 71)]
    cases += [
        Case("float32 D=300 (75 chunks: 3 per lane)", torch.float32, 300, N=1, Lq=5, M=2, P=2),
        Case("bfloat16 D=520 (65 chunks: 3 per lane)", torch.bfloat16, 520, N=1, Lq=5, M=2, P=2),
        Case("float64 D=70 (35 chunks: 2 per lane)", torch.float64, 70, N=1, Lq=6, M=2, P=2),
        Case("float32 misaligned view D=32", torch.float32, 32, offset=1),
        Case("bfloat16 misaligned view D=32", torch.bfloat16, 32, offset=3),
        Case("float16 misaligned view D=30 (scalar path)", torch.float16, 30, offset=1),
        Case("float32 N=0", N=0),
        Case("float32 Lq=0", Lq=0),
        Case("float32 D=0", D=0),
        Case("float32 P=0", P=0),
        Case("float32 M=1 L=1 one pixel", M=1, shapes=[[1, 1]]),
        Case("float32 one level 1x9", shapes=[[1, 9]], D=4),
        Case("float32 NaN/inf/border locations", torch.float32, 32, special=True),
        Case("bfloat16 NaN/inf/border locations", torch.bfloat16, 16, special=True),
        Case("float64 NaN/inf/border locations", torch.float64, 3, special=True),
        Case("float16 many groups (several blocks)", torch.float16, 16, N=2, Lq=70, M=4),
    ]
    return cases


def _offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values in a view ``offset`` elements into a larger buffer (so not 16-byte aligned)."""
    if offset == 0:
        return t
    storage = torch.empty(t.numel() + offset, dtype=t.dtype)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


def _special_locations(loc: torch.Tensor, shapes: list) -> torch.Tensor:
    """Query 0's points: NaN, +-inf, and exact edges of the map (0, 1, a half pixel in/out)."""
    loc = loc.clone()
    flat = loc[:, 0].reshape(-1, 2)  # (N*M*L*P, 2) of query 0
    specials = [
        (float("nan"), 0.5),
        (0.5, float("nan")),
        (float("inf"), 0.5),
        (-float("inf"), 0.5),
        (0.0, 0.0),
        (1.0, 1.0),
        (0.0, 1.0),
        (1.5, 0.5),
        (-0.5, 0.5),
        (0.5, -1e-7),
    ]
    for i in range(flat.shape[0]):
        flat[i] = torch.tensor(specials[i % len(specials)], dtype=loc.dtype)
    loc[:, 0] = flat.view(loc[:, 0].shape)
    return loc


def expected(value, spatial_shapes, level_start_index, loc, attn, grad_out):
    """Float64 reference output and gradients. Non-finite locations contribute nothing (as in the
    kernel, and as a NaN-free grid_sample would): they are computed with weight 0 at (0, 0), and
    their gradients are 0."""
    bad = ~torch.isfinite(loc).all(-1)  # (N, Lq, M, L, P)
    loc64 = torch.where(bad[..., None], 0.0, loc.double())
    attn64 = torch.where(bad, 0.0, attn.double())
    inputs = [t.detach().clone().requires_grad_(True) for t in (value.double(), loc64, attn64)]
    out = ms_deform_attn_reference(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    if out.numel() == 0:
        grads = [torch.zeros_like(t) for t in inputs]
    else:
        grads = list(torch.autograd.grad(out, inputs, grad_out.double(), allow_unused=True))
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    grads[1] = torch.where(bad[..., None], 0.0, grads[1])
    grads[2] = torch.where(bad, 0.0, grads[2])
    return out.detach(), *grads


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def run_case(module, case: Case) -> dict[str, float]:
    """Relative errors of output, grad_value, grad_loc, grad_attn for one case on ``module``."""
    S = sum(h * w for h, w in case.shapes)
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        case.shapes, N=case.N, Lq=case.Lq, M=case.M, D=case.D, P=case.P, dtype=case.dtype, seed=case.D + case.P
    )
    assert value.shape == (case.N, S, case.M, case.D)
    if case.special and case.Lq > 0:
        loc = _special_locations(loc, case.shapes)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(case.N, case.Lq, case.M * case.D, generator=g, dtype=torch.float64).to(case.dtype)
    want = expected(value, spatial_shapes, level_start_index, loc, attn, grad_out)
    value_in = _offset_copy(value, case.offset)
    grad_in = _offset_copy(grad_out, case.offset)
    out = cuda_unfused.forward(value_in, spatial_shapes, level_start_index, loc, attn, module=module)
    grads = cuda_unfused.backward(grad_in, value_in, spatial_shapes, level_start_index, loc, attn, module=module)
    got = (out, *grads)
    return {k: _rel_err(a, b) for k, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want)}


def check_case(module, case: Case) -> str | None:
    """None when the case passes, else one line saying what differed (or what rule broke)."""
    try:
        errors = run_case(module, case)
    except emulation.EmulationError as exc:
        return f"{case.name}: {exc}"
    tol = TOLERANCES[case.dtype]
    if all(e <= tol for e in errors.values()):
        return None
    return f"{case.name}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()) + f" (tol {tol:.0e})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--sanitize", action="store_true")
    parser.add_argument("--source", type=Path, default=cuda_unfused.SOURCE)
    parser.add_argument("--names", default="all", help="'all' or 'float': which kernel instantiations to build")
    args = parser.parse_args(argv)
    names = (
        cuda_unfused.KERNEL_NAMES if args.names == "all" else [n for n in cuda_unfused.KERNEL_NAMES if "<float," in n]
    )
    module = emulation.build_module(args.source, names, args.arch, sanitize=args.sanitize)
    cases = [c for c in all_cases() if args.names == "all" or c.dtype == torch.float32]
    start = time.perf_counter()
    failures = [f for f in (check_case(module, c) for c in cases) if f]
    for failure in failures:
        print(f"FAIL {failure}")
    print(
        f"{len(cases) - len(failures)}/{len(cases)} cases passed on {args.arch} in {time.perf_counter() - start:.1f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
