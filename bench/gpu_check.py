"""One command that proves a GPU machine: ``./dev gpu`` (``python bench/gpu_check.py [--dry-run]``).

Runs, with MSDA_BACKEND=cuda (the op must run the kernels, never fall back), each step below as its own
process, so that one failing step still leaves the others' figures:

- ops: ``python -m ops info`` (driver, NVRTC, cache), then ``python -m ops.bench.gpu``: both kernels
  against the float64 reference (fp32/bf16/fp16/fp64, awkward and encoder/decoder shapes, points and
  boxes, CUDA-graph replay, torch.compile fullgraph) and the op benchmark (unfused, fused, reference;
  forward and forward+backward; x the copy-bandwidth floor);
- model: R50 with box refinement, random weights, on CUDA in fp32 against the same weights in float64
  on the CPU (outputs within 1e-4); bf16 autocast training against fp32 from the same start on
  generated data (loss curves within 1%);
- throughput: ``bench/train_step.py`` (R50, 800x1066, batch 2; fp32 and bf16, eager and compiled) and
  ``bench/model.py`` (R50 with box refinement, inference at 800x1333, batch 1 and 8, fp32 and bf16,
  eager and replayed from a CUDA graph, the replay checked against the eager forward);
- Ray: the demo preset for one epoch on one GPU with Ray Train, then ``pipelines/infer.py`` on its
  checkpoint.

Writes ``gpu_report/report.md`` and ``gpu_report/report.json`` and prints the table; exit status 1 if a
step failed. ``--dry-run`` runs the same steps on the CPU with tiny shapes and no MSDA_BACKEND (about 6
minutes on 2 cores); the GPU-only op benchmark is replaced by the CPU op benchmark there. Nothing is downloaded: backbones start from random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# The model-level targets of the issue: fp32 parity against float64, bf16 loss against fp32.
PARITY_TOL = 1e-4
LOSS_CURVE_TOL = 0.01


@dataclass
class Step:
    """One row of the report."""

    name: str
    ok: bool
    seconds: float
    summary: str
    details: dict = field(default_factory=dict)


def run_process(name: str, argv: list[str], env: dict[str, str], log_dir: Path, timeout_s: int) -> Step:
    """Runs ``argv`` (a Python script or module of this repository), its output in ``log_dir/name.log``."""
    start = time.perf_counter()
    log = log_dir / f"{name.replace(' ', '_')}.log"
    try:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
        output, ok = proc.stdout + proc.stderr, proc.returncode == 0
        last = (output.strip().splitlines() or ["(no output)"])[-1]
        summary = last if ok else f"exit {proc.returncode}: {last}"
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        ok, summary = False, f"timed out after {timeout_s} s"
    log.write_text(output)
    return Step(name, ok, time.perf_counter() - start, summary, {"command": " ".join(argv), "log": str(log)})


def model_config(dry_run: bool):
    """R50 with box refinement (tiny sizes for the dry run), random backbone weights."""
    from core import DetrConfig, ModelConfig

    if dry_run:
        sizes = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2)
        sizes.update(dim_feedforward=64, num_queries=10, num_classes=5, dropout=0.0)
    else:
        sizes = dict(backbone="resnet50", num_classes=91, dropout=0.0)
    return DetrConfig(model=ModelConfig(**sizes, with_box_refine=True, backbone_weights=None))


def generated_batch(n: int, height: int, width: int, num_classes: int, seed: int):
    """Normalized-looking images, no padding, and 3 boxes per image (labels, normalized cxcywh)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, height, width, generator=g)
    mask = torch.zeros(n, height, width, dtype=torch.bool)
    targets = []
    for _ in range(n):
        centers = torch.rand(3, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(3, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (3,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes], dim=1)})
    return images, mask, targets


def model_parity(device: str, dry_run: bool) -> Step:
    """The model on ``device`` in fp32 against the same weights in float64 on the CPU."""
    import torch

    from core.build import build_detector

    start = time.perf_counter()
    cfg = model_config(dry_run)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    height, width = (64, 96) if dry_run else (800, 1066)
    images, mask, _ = generated_batch(2, height, width, cfg.model.num_classes, seed=1)
    with torch.no_grad():
        want = model.double()(images.double(), mask)
        got = model.float().to(device)(images.to(device), mask.to(device))
    errors = {k: (got[k].double().cpu() - want[k]).abs().max().item() for k in ("pred_logits", "pred_boxes")}
    worst = max(errors.values())
    summary = f"{device} fp32 vs CPU float64: max abs diff {worst:.2e} (target {PARITY_TOL:g})"
    return Step("model parity", worst <= PARITY_TOL, time.perf_counter() - start, summary, errors)


def loss_curves(device: str, dry_run: bool) -> Step:
    """bf16 autocast training against fp32 from the same weights and batches; the relative gap of the
    loss averaged over windows of 20 steps (single steps are noisy in both)."""
    import torch

    from core.build import build_criterion, build_detector

    start = time.perf_counter()
    cfg = model_config(dry_run)
    steps, window = (4, 2) if dry_run else (200, 20)
    height, width = (64, 96) if dry_run else (512, 683)
    curves = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = build_detector(cfg).to(device).train()
        criterion = build_criterion(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        losses = []
        for step in range(steps):
            images, mask, targets = generated_batch(2, height, width, cfg.model.num_classes, seed=100 + step)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs = model(images.to(device), mask.to(device))
            loss = criterion.total_loss(criterion(outputs, targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            losses.append(loss.item())
        curves[name] = losses
    means = {k: [sum(v[i : i + window]) / window for i in range(0, steps, window)] for k, v in curves.items()}
    gap = max(abs(b - f) / abs(f) for f, b in zip(means["fp32"], means["bf16"]))
    summary = f"bf16 vs fp32 loss over {steps} steps: worst {window}-step mean gap {gap:.2%} (target 1%)"
    return Step("bf16 loss curve", gap <= LOSS_CURVE_TOL, time.perf_counter() - start, summary, curves)


def in_process(name: str, fn, *args) -> Step:
    start = time.perf_counter()
    try:
        return fn(*args)
    except Exception as exc:  # a failing step is a report row, the others still run
        return Step(name, False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")


def inference(device: str, batch: int) -> list[str]:
    """bench/model.py's inference timing (fp32, and bf16 on CUDA) of R50 with box refinement."""
    argv = ["bench/model.py", "--device", device, "--variants", "with_box_refine", "--batch-size", str(batch)]
    return [*argv, "--skip-flops", "--skip-backward"]


def process_steps(dry_run: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, argv, timeout s) of the steps run as processes."""
    # The one-epoch run keeps one checkpoint folder: epoch 0.
    checkpoint = out / "ray_demo" / "checkpoint_epoch0000"
    infer = ["pipelines/infer.py", "--checkpoint", str(checkpoint), "--output", str(out / "detections")]
    tiny_image, one_iter = ["--height", "64", "--width", "96"], ["--iters", "1", "--warmup", "0"]
    if dry_run:
        train_step = ["bench/train_step.py", "--device", "cpu", "--preset", "tiny", "--batch-size", "1"]
        train_step += [*tiny_image, *one_iter]
        demo = ["--preset", "tiny", "--set", "train.epochs=1", "--set", "train.num_workers=1"]
        demo += ["--set", f"train.storage_path={out}", "--set", "train.name=ray_demo"]
        return [
            ("ops info", ["-m", "ops", "info"], 60),
            ("op benchmark (CPU)", ["-m", "ops.bench.cpu", "--reps", "1", "--op-size", "64x96"], 120),
            ("train step fp32", [*train_step, "--amp", "off", "--json", str(out / "train_fp32.json")], 300),
            ("inference batch 1", [*inference("cpu", 1), "--backbone", "resnet18", *tiny_image, *one_iter], 300),
            ("ray train demo", ["pipelines/train.py", *demo], 600),
            ("infer on its checkpoint", [*infer, "--input", "data/tiny/val"], 300),
        ]
    train_step = ["bench/train_step.py", "--device", "cuda", "--preset", "r50", "--batch-size", "2"]
    train_step += ["--set", "model.backbone_weights=null"]
    steps = [
        ("ops info", ["-m", "ops", "info"], 60),
        ("op checks and benchmark", ["-m", "ops.bench.gpu", "--json", str(out / "ops.json")], 900),
    ]
    for amp in ("off", "bf16"):
        for compiled in (False, True):
            name = f"train step {'fp32' if amp == 'off' else amp}{' compiled' if compiled else ''}"
            tag = name.replace(" ", "_")
            argv = [*train_step, "--amp", amp, "--json", str(out / f"{tag}.json")] + (["--compile"] if compiled else [])
            steps.append((name, argv, 600))
    for batch in (1, 8):
        steps.append((f"inference batch {batch}", [*inference("cuda", batch), "--cuda-graph"], 600))
    demo = ["--preset", "demo", "--set", "train.epochs=1", "--set", "train.num_workers=1"]
    demo += ["--set", "train.use_gpu=true", "--set", f"train.storage_path={out}", "--set", "train.name=ray_demo"]
    steps.append(("ray train demo", ["pipelines/train.py", *demo], 900))
    steps.append(("infer on its checkpoint", [*infer, "--input", "data/demo/val", "--gpus-per-actor", "1"], 600))
    return steps


def markdown(steps: list[Step], device: str) -> str:
    lines = [f"# GPU check on {device}", "", "| step | result | seconds | summary |", "|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {'PASS' if s.ok else 'FAIL'} | {s.seconds:.0f} | {s.summary} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    p.add_argument("--out", default="gpu_report", help="report folder (default gpu_report)")
    args = p.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); --dry-run runs on the CPU")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not args.dry_run:
        import ops

        env["MSDA_BACKEND"] = "cuda"
        ops.set_backend("cuda")  # the in-process model steps too

    steps = [run_process(n, a, env, out, t) for n, a, t in process_steps(args.dry_run, out)[:2]]
    steps.append(in_process("model parity", model_parity, device, args.dry_run))
    steps.append(in_process("bf16 loss curve", loss_curves, device, args.dry_run))
    steps += [run_process(n, a, env, out, t) for n, a, t in process_steps(args.dry_run, out)[2:]]

    table = markdown(steps, name)
    (out / "report.md").write_text(table)
    (out / "report.json").write_text(json.dumps({"device": name, "steps": [asdict(s) for s in steps]}, indent=2))
    print(table)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
