"""Parameters, FLOPs and speed of each Deformable DETR variant: ``python bench/model.py [--device cuda] ...``.

For every variant (ResNet-50, paper sizes, random weights: speed does not depend on their values):
parameters; FLOPs of one forward pass at 800x1333, counted by ``torch.utils.flop_counter`` plus an
analytic count of the deformable sampling, which that counter cannot see inside the custom op; and
seconds per image for inference and for a training step (forward, criterion, backward), in float32
and, on CUDA, bfloat16 autocast; with ``--cuda-graph``, also inference replayed from a CUDA graph (the
Python launch overhead gone), checked against the eager forward on the same input.

FLOP conventions: torch counts a multiply-add as 2 FLOPs. The paper (like DETR, via fvcore) counts it
as 1, so its "173 GFLOPs" compares with our GMACs column (= FLOPs / 2).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.build import build_model
from core.config import DetrConfig, ModelConfig
from core.detector import DeformableDETR
from ops import MSDeformAttn, cpu_kernel_available, cuda_kernel_available, get_backend
from ops.bench.common import capture_graph, rel_err
from pipelines.presets import PRESETS

VARIANTS: dict[str, dict[str, bool | int]] = {
    "plain": {},
    "with_box_refine": {"with_box_refine": True},
    "two_stage": {"two_stage": True},
    "with_box_refine_two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
}
# Per sampled point and channel: 4 bilinear corner multiply-adds + 1 attention-weight multiply-add.
_SAMPLING_FLOPS_PER_POINT_CHANNEL = 2 * (4 + 1)
# A replayed graph runs the eager forward's kernels: its outputs may differ by no more than this
# (relative to the largest output), else the capture missed something.
GRAPH_TOL = 1e-3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(VARIANTS),
        default=["plain", "with_box_refine", "two_stage", "with_box_refine_two_stage"],
    )
    p.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "resnet101"), default="resnet50")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: float32 on CPU, float32 and bfloat16 on CUDA",
    )
    p.add_argument("--skip-backward", action="store_true")
    p.add_argument("--skip-flops", action="store_true")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd inference and training steps")
    p.add_argument(
        "--cuda-graph", action="store_true", help="also time inference replayed from a CUDA graph (--device cuda)"
    )
    p.add_argument("--smoke", action="store_true", help="the tiny preset's model, 64x96, 1 iteration: checks it runs")
    args = p.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        p.error(f"--cuda-graph needs --device cuda, got --device {args.device}")
    if args.smoke:
        args.height, args.width, args.iters, args.warmup = 64, 96, 1, 0
    if min(args.height, args.width) < 32:
        p.error(f"--height and --width must be >= 32, got {args.height}x{args.width}")
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--batch-size and --iters must be >= 1 and --warmup >= 0")
    return args


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); shared heads are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_flops(model: DeformableDETR, images: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one inference forward pass.

    Returns:
        (counted, sampling): FLOPs seen by FlopCounterMode (convolutions, matmuls: the linear layers
        of the attention included), and the analytic FLOPs of the deformable sampling itself.
    """
    sampling = 0

    def add_sampling(module: MSDeformAttn, args: tuple) -> None:
        nonlocal sampling
        n, lq, c = args[0].shape  # query (N, Lq, C)
        points = module.n_heads * module.n_levels * module.n_points
        sampling += n * lq * points * (c // module.n_heads) * _SAMPLING_FLOPS_PER_POINT_CHANNEL

    hooks = [m.register_forward_pre_hook(add_sampling) for m in model.modules() if isinstance(m, MSDeformAttn)]
    # FlopCounterMode's module tracker trips over no_grad views of parameters that require grad
    # (query_embed's split), so switch gradients off on the parameters instead.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            model(images, mask)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for h in hooks:
            h.remove()
    return counter.get_total_flops(), sampling


def _seconds_per_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Mean wall time of fn() after warmup calls, synchronizing CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def capture_inference(
    run: Callable[..., dict], images: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> tuple[Callable[[], None], float]:
    """One no-grad forward at these (static) inputs captured in a CUDA graph.

    Three warm-up calls run outside the capture (``capture_graph``): cuDNN's autotuning, the
    deformable-attention kernels' first loads and the op's level-table check; autocast's weight cache is
    off, since cached casts would not survive into the replay.

    Returns:
        (the graph's replay, the largest |replay - eager| of pred_logits and pred_boxes relative to the
        largest |eager| value).
    """
    device = images.device

    def forward() -> dict:
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            return run(images, mask)

    graph, captured = capture_graph(device, forward, warmups=3)
    graph.replay()
    eager = forward()
    torch.cuda.synchronize(device)
    err = max(rel_err(captured[k], eager[k]) for k in ("pred_logits", "pred_boxes"))
    return graph.replay, err


def _random_targets(
    batch_size: int, num_classes: int, device: torch.device, num_boxes: int = 8
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch_size):
        centers = torch.rand(num_boxes, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(num_boxes, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(1, num_classes, (num_boxes,), generator=g)
        targets.append({"boxes": torch.cat([centers, sizes], 1).to(device), "labels": labels.to(device)})
    return targets


def benchmark_variant(name: str, opts: argparse.Namespace) -> dict[str, object]:
    """All measurements of one variant as a flat dict (times in seconds per image)."""
    device = torch.device(opts.device)
    sizes = PRESETS["tiny"]["model"] if opts.smoke else {"backbone": opts.backbone}
    cfg = DetrConfig(model=ModelConfig(**{**sizes, **VARIANTS[name]}))
    model, criterion, _ = build_model(cfg)
    model.to(device)
    total, trainable = count_parameters(model)
    row: dict[str, object] = {"variant": name, "params_M": total / 1e6, "trainable_M": trainable / 1e6}

    g = torch.Generator().manual_seed(0)
    images = torch.randn(opts.batch_size, 3, opts.height, opts.width, generator=g).to(device)
    mask = torch.zeros(opts.batch_size, opts.height, opts.width, dtype=torch.bool, device=device)
    targets = _random_targets(opts.batch_size, cfg.model.num_classes, device)

    if not opts.skip_flops:
        model.eval()
        counted, sampling = count_flops(model, images[:1], mask[:1])
        row.update(gflops=(counted + sampling) / 1e9, gflops_sampling=sampling / 1e9, gmacs=(counted + sampling) / 2e9)

    run = torch.compile(model) if opts.compile else model
    dtypes = opts.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def forward() -> None:
            with torch.no_grad(), autocast:
                run(images, mask)

        def train_step() -> None:
            with autocast:
                loss = criterion.total_loss(criterion(run(images, mask), targets))
            loss.backward()
            model.zero_grad(set_to_none=True)

        model.eval()
        row[f"infer_s_{dtype_name}"] = _seconds_per_call(forward, device, opts.iters, opts.warmup) / opts.batch_size
        if opts.cuda_graph:
            replay, row[f"graph_err_{dtype_name}"] = capture_inference(run, images, mask, dtype)
            seconds = _seconds_per_call(replay, device, opts.iters, opts.warmup)
            row[f"infer_s_{dtype_name}_graph"] = seconds / opts.batch_size
        if not opts.skip_backward:
            model.train()
            row[f"train_s_{dtype_name}"] = (
                _seconds_per_call(train_step, device, opts.iters, opts.warmup) / opts.batch_size
            )
    return row


def _format_rows(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [
        [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns] for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    opts = parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        kernel_ok, reason = cuda_kernel_available()
        where = f"{torch.cuda.get_device_name(device)}"
    else:
        kernel_ok, reason = cpu_kernel_available()
        where = f"CPU, {torch.get_num_threads()} threads"
    if get_backend() == "reference":
        kernel_ok, reason = False, "MSDA_BACKEND=reference"
    kernel = f"{device.type.upper()} kernel" if kernel_ok else f"PyTorch reference ({reason})"
    where += f"; deformable attention: {kernel}"
    print(
        f"device: {where}; input {opts.batch_size}x3x{opts.height}x{opts.width}; {opts.iters} timed iters after "
        f"{opts.warmup} warmup; torch {torch.__version__}{'; torch.compile' if opts.compile else ''}"
    )
    rows = []
    for name in opts.variants:
        rows.append(benchmark_variant(name, opts))
        print(_format_rows(rows[-1:]), flush=True)
    print()
    print(_format_rows(rows))
    print(
        "gflops: torch FlopCounterMode (2 per multiply-add) + analytic deformable sampling (gflops_sampling), "
        "batch 1; gmacs = gflops / 2 is the paper's convention (173 for plain). "
        "*_s_*: seconds per image; FPS = 1 / infer_s."
    )
    for row in rows:
        fps = {
            k.replace("infer_s_", ""): round(1 / v, 2)
            for k, v in row.items()
            if k.startswith("infer_s_") and isinstance(v, float)
        }
        print(f"{row['variant']}: inference FPS {fps}")
    bad = [
        f"{r['variant']} {k}={v:.1e}"
        for r in rows
        for k, v in r.items()
        if k.startswith("graph_err_") and v > GRAPH_TOL
    ]
    if bad:
        raise SystemExit(
            f"CUDA graph replay differs from the eager forward by more than {GRAPH_TOL:g}: {', '.join(bad)}"
        )
    return rows


if __name__ == "__main__":
    main()
