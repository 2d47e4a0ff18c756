"""CPU speed of Deformable DETR R50 with the C++ kernel of the op against the reference path, in one run.

The model's inference forward at ``--model-size`` (default 800x1066) and a training step (forward,
loss, backward, AdamW) at ``--train-size`` (default 512x683), each timed on the three paths of
``ops.bench.cpu`` (before / reference / kernel) within each repetition::

    python bench/cpu_kernel.py [--sections model,train] [--reps 5] [--threads T] [--batch-size 1]

``python -m ops.bench.cpu`` times the op alone.
"""

from __future__ import annotations

import argparse
import os

import torch

from core import DetrConfig, ModelConfig, build_model
from core.backbone import FrozenBatchNorm2d
from ops.bench.cpu import PATHS, prepare, report, size, time_paths
from pipelines.presets import PRESETS


def _model(batch_size: int, height: int, width: int, smoke: bool):
    torch.manual_seed(0)
    cfg = DetrConfig(model=ModelConfig(**PRESETS["tiny"]["model"])) if smoke else DetrConfig()
    model, criterion, _ = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=g)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    targets = []
    for _ in range(batch_size):  # 7 boxes, COCO's mean
        centers = torch.rand(7, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(7, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, cfg.model.num_classes, (7,), generator=g)
        targets.append({"boxes": torch.cat([centers, sizes], 1), "labels": labels})
    return model, criterion, images, mask, targets


def bench_model(height: int, width: int, batch_size: int, reps: int, smoke: bool) -> None:
    model, _, images, mask, _ = _model(batch_size, height, width, smoke)
    model.eval()
    print(f"model forward (R50, inference) at {height}x{width}, batch {batch_size}", flush=True)

    def forward() -> None:
        with torch.no_grad():
            model(images, mask)

    report("  model forward", time_paths({p: forward for p in PATHS}, reps, FrozenBatchNorm2d))


def bench_train(height: int, width: int, batch_size: int, reps: int, smoke: bool) -> None:
    model, criterion, images, mask, targets = _model(batch_size, height, width, smoke)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    print(f"training step (R50: forward, loss, backward, AdamW) at {height}x{width}, batch {batch_size}", flush=True)

    def step() -> None:
        loss = criterion.total_loss(criterion(model(images, mask), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    report("  training step", time_paths({p: step for p in PATHS}, reps, FrozenBatchNorm2d))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="model,train", help="comma list of model, train")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--model-size", type=size, default=(800, 1066), help="HxW of the inference forward")
    parser.add_argument("--train-size", type=size, default=(512, 683), help="HxW of the training step")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset's model, 64x96, 1 rep: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model_size, args.train_size, args.reps = (64, 96), (64, 96), 1
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(sections) - {"model", "train"}:
        parser.error(f"--sections must be a comma list of model, train; got {args.sections!r}")
    prepare(args.threads)
    if "model" in sections:
        bench_model(*args.model_size, args.batch_size, args.reps, args.smoke)
    if "train" in sections:
        bench_train(*args.train_size, args.batch_size, args.reps, args.smoke)
    print(f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
