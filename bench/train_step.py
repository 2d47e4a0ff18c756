"""Training-step throughput on one device: images/s and peak memory of the real training step.

    python bench/train_step.py                         # R50 at COCO size, the best device here
    python bench/train_step.py --compile --iters 50    # with torch.compile
    python bench/train_step.py --device cpu --iters 3 --warmup 1 --batch-size 1
    python bench/train_step.py --preset r50_two_stage --amp off --json out.json

It runs ``engine.train_one_epoch`` (autocast, loss, backward, clipping, AdamW with the paper's groups)
on random images of a COCO-like size (800 x 1066 by default: short side 800, COCO's mean 4:3 aspect)
with 7 boxes each, COCO's mean. Data loading is left out: this is the model's share of a step; Ray
Data feeds the real run (``python bench/data.py`` times that side). Target on an H100 with
bfloat16: >= 20 images/s (the paper's setup gave about 5 images/s per V100).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from core.build import build_model
from pipelines.engine import (
    build_optimizer,
    freeze_zero_lr_params,
    peak_memory_mb,
    resolve_amp_dtype,
    train_one_epoch,
)
from pipelines.job_config import PRESETS, ConfigError, load_job_config


def synthetic_batches(
    n: int,
    batch_size: int,
    height: int,
    width: int,
    boxes_per_image: int,
    num_classes: int,
    device: torch.device,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """``n`` batches of random images (one pre-made batch reused) with random normalized cxcywh boxes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, height, width, generator=g).to(device)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    targets = []
    for i in range(batch_size):
        centers = torch.rand(boxes_per_image, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(boxes_per_image, 2, generator=g) * 0.3 + 0.05
        targets.append(
            {
                "boxes": torch.cat([centers, sizes], 1).to(device),
                "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g).to(device),
                "image_id": i,
                "orig_size": torch.tensor([height, width], device=device),
                "size": torch.tensor([height, width], device=device),
            }
        )
    for _ in range(n):
        yield {"images": images, "mask": mask, "targets": targets}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Times ``args.iters`` training steps after ``args.warmup`` untimed ones; returns the figures."""
    job = load_job_config(preset=args.preset, overrides=args.overrides)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.amp or job.train.amp
    amp_dtype = resolve_amp_dtype(amp, device)
    torch.manual_seed(0)
    model, criterion, _ = build_model(job.detr_config(), load_backbone_weights=False)
    model.to(device)
    criterion.to(device)
    freeze_zero_lr_params(model, job.train)
    optimizer = build_optimizer(model, job.train)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    net = torch.compile(model) if args.compile else model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(record: dict[str, Any]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        if args.verbose:
            print(f"  step {record['step']}: {step_times[-1]:.3f} s  loss {record['loss']:.3f}", flush=True)

    compile_start = time.perf_counter()
    train_one_epoch(
        net,
        criterion,
        synthetic_batches(
            args.warmup + args.iters,
            args.batch_size,
            args.height,
            args.width,
            args.boxes,
            job.model.num_classes,
            device,
        ),
        optimizer,
        None,
        device=device,
        amp_dtype=amp_dtype,
        scaler=scaler,
        clip_max_norm=job.train.clip_max_norm,
        on_step=on_step,
    )
    timed = step_times[args.warmup :]
    warmup_s = sum(step_times[: args.warmup])
    median = statistics.median(timed)
    return {
        "preset": args.preset,
        "variant": job.detr_config().variant(),
        "backbone": job.model.backbone,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "compiled": bool(args.compile),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "batch_size": args.batch_size,
        "image_size": [args.height, args.width],
        "iters": len(timed),
        "step_s_median": median,
        "step_s_mean": statistics.fmean(timed),
        "images_per_s": args.batch_size / median,
        "peak_mem_mb": peak_memory_mb(device),
        "warmup_s": warmup_s,
        "total_s": time.perf_counter() - compile_start,
        "torch": torch.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Training-step throughput (images/s, peak memory) on one device.")
    p.add_argument("--preset", default="r50", choices=sorted(PRESETS), help="model and recipe (default r50)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="default: the preset's (auto = bf16 on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (the paper: 4 per GPU)")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1066)
    p.add_argument("--boxes", type=int, default=7, help="target boxes per image")
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, kernel builds)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--verbose", action="store_true", help="print every step")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run_benchmark(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{out['preset']} ({out['variant']}, {out['backbone']}) on {out['device']}, {out['amp']}, "
        f"{'compiled' if out['compiled'] else 'eager'}, batch {out['batch_size']} at "
        f"{out['image_size'][0]}x{out['image_size'][1]}:"
    )
    print(
        f"  {out['images_per_s']:.2f} images/s  (median step {out['step_s_median']:.3f} s over {out['iters']} steps)"
        f"  peak memory {out['peak_mem_mb']:.0f} MiB  warmup {out['warmup_s']:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
