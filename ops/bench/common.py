"""What the GPU checks and benchmarks of both CUDA kernels share: the shapes they run, tolerances, the
PASS/FAIL/SKIP report, CUDA-event timing, the copy-bandwidth floor and the markdown table.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).
"""

from __future__ import annotations

import statistics
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

# Deformable DETR at 800x1200 input: strides 8, 16, 32, 64.
ENCODER_SHAPES = [[100, 150], [50, 75], [25, 38], [13, 19]]
ENCODER_S = sum(h * w for h, w in ENCODER_SHAPES)  # 19947
N_HEADS, HEAD_DIM, N_POINTS = 8, 32, 4
DECODER_QUERIES = 300
SMALL_SHAPES = [[10, 12], [5, 6]]  # graph, compile and stream checks


# Largest |got - want| allowed, relative to max(1, max |want|), against the float64 reference fed
# the same (already rounded) inputs. float32 only differs by accumulation order; half types also
# round the output and grad_value to 8 (bfloat16) or 11 (float16) mantissa bits.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# Check outcomes. A check returns (True/False, detail), or (SKIP, detail) when this machine cannot
# run it (too little memory, one GPU): a SKIP neither passes nor fails the run.
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Report:
    """Collects PASS/FAIL/SKIP lines and benchmark rows; prints as it goes."""

    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.rows: list[dict] = []
        self.targets: list[dict] = []

    def check(self, name: str, ok: bool | str, detail: str = "") -> None:
        """Record one check: ok is True (PASS), False (FAIL) or SKIP."""
        status = SKIP if isinstance(ok, str) and ok == SKIP else PASS if ok else FAIL
        self.checks.append({"name": name, "status": status, "detail": detail})
        print(f"{status} {name}{': ' + detail if detail else ''}", flush=True)

    def run_check(self, name: str, fn: Callable[[], tuple[bool | str, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as exc:  # a crash is a failure of that check, not of the whole run
            ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        self.check(name, ok, detail)

    @property
    def failed(self) -> bool:
        return any(c["status"] == FAIL for c in self.checks)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def capture_graph(device: torch.device, step: Callable[[], T], warmups: int) -> tuple[torch.cuda.CUDAGraph, T]:
    """``step`` captured in a CUDA graph: the graph, and the outputs its replays write.

    ``warmups`` calls run on a side stream first, as ``torch.cuda.graph`` asks: first loads, autotuning
    and one-time checks happen there, outside the capture.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def check_graph_replay(
    device: torch.device,
    step: Callable[[], tuple[torch.Tensor, ...]],
    static: list[torch.Tensor],
    new_values: Callable[[], tuple[torch.Tensor, ...]],
) -> tuple[bool, str]:
    """Captures ``step`` in a CUDA graph, copies ``new_values()`` into its ``static`` inputs, replays it,
    and compares the replay's outputs with an eager ``step`` on the same inputs."""
    graph, captured = capture_graph(device, step, warmups=2)
    with torch.no_grad():
        for s, t in zip(static, new_values()):
            s.copy_(t)
    graph.replay()
    expected = step()
    torch.cuda.synchronize(device)
    errors = [rel_err(c, e) for c, e in zip(captured, expected)]
    return max(errors) <= 1e-6, f"replay with new inputs vs eager: max err {max(errors):.1e}"


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of fn on the GPU in milliseconds, each repeat bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn: Callable[[], object], launches: int = 50) -> float:
    """GPU milliseconds per call over ``launches`` calls queued back to back between one pair of events:
    the kernels' own time once the queue stays full, without the launch prologue that one call from an
    idle GPU (``time_ms``) holds. A call whose Python side outlasts its kernels still shows Python here."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / launches


def profiled_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """Milliseconds per call that the GPU spent in kernels and copies, summed from torch.profiler's CUDA
    activity (no gaps between kernels, no launch time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s; a copy reads and writes nbytes each."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, repeats=10)
    return 2 * nbytes / (ms * 1e-3)


def timed_rows(
    shape: str, dtype: torch.dtype, paths: dict[str, tuple], floor: tuple[int, int], bandwidth: float
) -> list[dict]:
    """Times every path and returns a row each: the kernel time (back-to-back launches; speed-ups over
    the first path, the reference, and ratios to the memory-traffic floor are of it), the time of one
    call from an idle GPU (``*_call_ms``: Python's launch prologue included) and the profiler's GPU time.

    Args:
        paths: name -> (forward, a maker of the backward-only callable, forward+backward).
        floor: bytes that forward and forward+backward must move at least (``floor_bytes``).
        bandwidth: bytes/s of a device-to-device copy, measured in the same run.
    """
    floor_fwd_ms, floor_fb_ms = (1e3 * b / bandwidth for b in floor)
    floor_bwd_ms = floor_fb_ms - floor_fwd_ms
    # Each backward-only callable (and the graph it holds) lives only while it is timed.
    timings, calls, profiled = {}, {}, {}
    for path, (f, make_b, fb) in paths.items():
        b = make_b()
        timings[path] = (back_to_back_ms(f), back_to_back_ms(b), back_to_back_ms(fb))
        calls[path] = (time_ms(f), time_ms(b), time_ms(fb))
        profiled[path] = (profiled_ms(f), profiled_ms(fb))
        del b
    ref_fwd, ref_bwd, ref_fb = next(iter(timings.values()))
    return [
        {
            "shape": shape,
            "dtype": str(dtype).removeprefix("torch."),
            "path": path,
            "forward_call_ms": calls[path][0],
            "backward_call_ms": calls[path][1],
            "forward_backward_call_ms": calls[path][2],
            "forward_profiled_ms": profiled[path][0],
            "forward_backward_profiled_ms": profiled[path][1],
            "forward_ms": fwd_ms,
            "backward_ms": bwd_ms,
            "forward_backward_ms": fb_ms,
            "forward_speedup": ref_fwd / fwd_ms,
            "backward_speedup": ref_bwd / bwd_ms,
            "forward_backward_speedup": ref_fb / fb_ms,
            "forward_floor_ms": floor_fwd_ms,
            "backward_floor_ms": floor_bwd_ms,
            "forward_backward_floor_ms": floor_fb_ms,
            "forward_over_floor": fwd_ms / floor_fwd_ms,
            "backward_over_floor": bwd_ms / floor_bwd_ms,
            "forward_backward_over_floor": fb_ms / floor_fb_ms,
        }
        for path, (fwd_ms, bwd_ms, fb_ms) in timings.items()
    ]


def markdown_table(rows: list[dict]) -> str:
    """Kernel times (back-to-back launches), the profiler's and one call's beside them, then ratios."""
    lines = [
        "| shape | dtype | path | fwd ms | fwd profiler ms | fwd call ms | bwd ms | fwd+bwd ms | fwd+bwd call ms "
        "| fwd speed-up | bwd speed-up | fwd+bwd speed-up | fwd / floor | bwd / floor | fwd+bwd / floor |",
        "|---|---|---|" + "---:|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['path']} | {r['forward_ms']:.3f} | {r['forward_profiled_ms']:.3f} | "
            f"{r['forward_call_ms']:.3f} | {r['backward_ms']:.3f} | "
            f"{r['forward_backward_ms']:.3f} | {r['forward_backward_call_ms']:.3f} | "
            f"{r['forward_speedup']:.1f}x | {r['backward_speedup']:.1f}x | "
            f"{r['forward_backward_speedup']:.1f}x | {r['forward_over_floor']:.2f}x | {r['backward_over_floor']:.2f}x | "
            f"{r['forward_backward_over_floor']:.2f}x |"
        )
    return "\n".join(lines)
