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
- throughput: ``bench/model.py`` (R50 with box refinement, inference at 800x1333, batch 1 and 8, fp32
  and bf16, eager and replayed from a CUDA graph, the replay checked against the eager forward) and
  ``bench/train_step.py`` (R50, 800x1066, batch 2; fp32 and bf16, eager, then compiled);
- Ray: the demo preset for one epoch on one GPU with Ray Train, then ``pipelines/infer.py`` on its
  checkpoint.

The steps run in that order, the compiled training steps last (their compile is the slowest part), within
a time budget (``--budget-s``, 8 minutes): a step the budget does not reach is reported NOT RUN, and a step
still running when it ends is stopped with its processes. ``gpu_report/report.md`` and ``report.json`` are
rewritten whole after every step (with one log per step beside them), so a run stopped from outside keeps
what it finished; the table is printed at the end; exit status 1 if a step failed or did not run.
``--only STEP ...`` runs the named steps alone (a failed one again, say), the report keeping its other rows.
``--dry-run`` runs the same steps on the CPU with tiny shapes and no MSDA_BACKEND, the CPU op benchmark in
place of the GPU one, and first parses the GPU steps' arguments with their scripts' own parsers. Nothing is
downloaded: backbones start from random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# The model-level targets of the issue: fp32 parity against float64, bf16 loss against fp32.
PARITY_TOL = 1e-4
LOSS_CURVE_TOL = 0.01
# A step is not started with less than this left of the budget.
MIN_STEP_S = 15


@dataclass
class Step:
    """One row of the report: PASS, FAIL, or NOT RUN (``ran`` False)."""

    name: str
    ok: bool
    seconds: float
    summary: str
    details: dict = field(default_factory=dict)
    ran: bool = True

    @property
    def result(self) -> str:
        return "NOT RUN" if not self.ran else "PASS" if self.ok else "FAIL"


@dataclass
class Spec:
    """A step to run: ``python ARGV`` from the repository root, stopped after ``timeout_s``."""

    name: str
    argv: list[str]
    timeout_s: int

    @property
    def slug(self) -> str:
        return slug(self.name)


def slug(name: str) -> str:
    """A step's name as a file name: ``op benchmark (CPU)`` -> ``op_benchmark_CPU``."""
    return name.replace(" ", "_").replace("(", "").replace(")", "")


# The SIGTERM that reached the check (an outer time limit, say): the running step is stopped, no other
# starts, and the report is written.
_stop_signal: int | None = None


def _request_stop(signum, frame) -> None:
    global _stop_signal
    _stop_signal = signum


def run_step(spec: Spec, env: dict[str, str], out: Path, timeout_s: float) -> Step:
    """Runs one step in its own process group, its output in ``out/SLUG.log``; whatever of the group is
    left when it ends or is stopped (a Ray cluster it started, say) is killed. A step that writes a JSON
    file with ``--json PATH`` has that file's content in its details."""
    start = time.perf_counter()
    log = out / f"{spec.slug}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, *spec.argv],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while (code := proc.poll()) is None and _stop_signal is None and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):  # none of the group is left
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    details: dict = {"command": " ".join(spec.argv), "log": str(log)}
    if "--json" in spec.argv and code is not None:
        path = Path(spec.argv[spec.argv.index("--json") + 1])
        try:
            details["result"] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # not written, or cut short
            details["result"] = f"unreadable: {exc}"
    if code is None:
        reason = f"stopped by signal {_stop_signal}" if _stop_signal else f"timed out after {timeout_s:.0f} s"
        summary = f"{reason}: {last}"
    else:
        summary = last if code == 0 else f"exit {code}: {last}"
    return Step(spec.name, code == 0, time.perf_counter() - start, summary, details)


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


def ieee_fp32() -> None:
    """fp32 means IEEE fp32 in this process: cuDNN's convolutions default to TF32 on Ampere and later
    GPUs (a 10-bit mantissa, errors near 1e-3), which would fail the 1e-4 parity and blur the fp32 curve
    that bf16 is held to. Run on the CPU too, so that the dry run checks the settings exist."""
    import torch

    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9; mixing in the older flags is an error there
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def model_parity(device: str, dry_run: bool) -> tuple[bool, str, dict]:
    """The model on ``device`` in fp32 against the same weights in float64 on the CPU."""
    import torch

    from core.build import build_detector

    ieee_fp32()
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
    return worst <= PARITY_TOL, summary, errors


def loss_curves(device: str, dry_run: bool) -> tuple[bool, str, dict]:
    """bf16 autocast training against fp32 from the same weights and batches; the relative gap of the
    loss averaged over windows of 20 steps (single steps are noisy in both)."""
    import torch

    from core.build import build_criterion, build_detector

    ieee_fp32()
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
    return gap <= LOSS_CURVE_TOL, summary, curves


def _load(target: list[str]):
    """The module a step runs: ``["-m", NAME, ...]`` or ``["path/script.py", ...]``."""
    if target[0] == "-m":
        return importlib.import_module(target[1])
    path = ROOT / target[0]
    spec = importlib.util.spec_from_file_location(f"_checked_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def check_arguments(specs: list[Spec]) -> tuple[bool, str, dict]:
    """Parses each step's arguments with its script's own ``parse_args`` and builds the job config they
    name, running nothing: a renamed option or config field fails here, not on a lent GPU."""
    from pipelines.job_config import load_job_config

    problems = {}
    checked = 0
    for spec in specs:
        split = 2 if spec.argv[0] == "-m" else 1
        script, args = spec.argv[:split], spec.argv[split:]
        module = _load(script)
        if not hasattr(module, "parse_args"):
            continue  # `-m ops info` and gpu_check's own steps: no options of their own to check
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                ns = module.parse_args(args)
            if hasattr(module, "config_from_args"):
                module.config_from_args(ns)
            elif hasattr(ns, "preset") and hasattr(ns, "overrides"):
                load_job_config(preset=ns.preset, overrides=ns.overrides)
            checked += 1
        except SystemExit:
            problems[spec.name] = stderr.getvalue().strip().splitlines()[-1]
        except Exception as exc:  # a config error, which names the field
            problems[spec.name] = " ".join(f"{type(exc).__name__}: {exc}".split())
    if problems:
        return False, "; ".join(f"{k}: {v}" for k, v in problems.items()), problems
    return True, f"the arguments of {checked} GPU steps parse and their configs build", {}


def own_step(name: str, dry_run: bool, out: Path) -> Spec:
    """A step that runs a function of this file in its own process (``--step``)."""
    timeout_s = {"GPU step arguments": 120, "model parity": 300, "bf16 loss curve": 400}[name]
    argv = ["bench/gpu_check.py", "--step", name, "--json", str(out / f"{slug(name)}.json")]
    return Spec(name, argv + ["--dry-run"] * dry_run, timeout_s)


def inference(device: str, batch: int) -> list[str]:
    """bench/model.py's inference timing (fp32, and bf16 on CUDA) of R50 with box refinement."""
    argv = ["bench/model.py", "--device", device, "--variants", "with_box_refine", "--batch-size", str(batch)]
    return [*argv, "--skip-flops", "--skip-backward"]


def specs(dry_run: bool, out: Path) -> list[Spec]:
    """The steps, in the order they run."""
    # The one-epoch run keeps one checkpoint folder: epoch 0.
    checkpoint = out / "ray_demo" / "checkpoint_epoch0000"
    infer = ["pipelines/infer.py", "--checkpoint", str(checkpoint), "--output", str(out / "detections")]
    model_steps = [own_step("model parity", dry_run, out), own_step("bf16 loss curve", dry_run, out)]
    if dry_run:
        tiny_image, one_iter = ["--height", "64", "--width", "96"], ["--iters", "1", "--warmup", "0"]
        train_step = ["bench/train_step.py", "--device", "cpu", "--preset", "tiny", "--batch-size", "1"]
        train_step += [*tiny_image, *one_iter]
        demo = ["--preset", "tiny", "--set", "train.epochs=1", "--set", "train.num_workers=1"]
        demo += ["--set", f"train.storage_path={out}", "--set", "train.name=ray_demo"]
        return [
            own_step("GPU step arguments", dry_run, out),
            Spec("ops info", ["-m", "ops", "info"], 60),
            Spec("op benchmark (CPU)", ["-m", "ops.bench.cpu", "--reps", "1", "--op-size", "64x96"], 120),
            *model_steps,
            Spec("inference batch 1", [*inference("cpu", 1), "--backbone", "resnet18", *tiny_image, *one_iter], 300),
            Spec("train step fp32", [*train_step, "--amp", "off", "--json", str(out / "train_fp32.json")], 300),
            Spec("ray train demo", ["pipelines/train.py", *demo], 600),
            Spec("infer on its checkpoint", [*infer, "--input", "data/tiny/val"], 300),
        ]
    steps = [
        Spec("ops info", ["-m", "ops", "info"], 60),
        Spec("op checks and benchmark", ["-m", "ops.bench.gpu", "--json", str(out / "ops.json")], 400),
        *model_steps,
    ]
    for batch in (1, 8):
        steps.append(Spec(f"inference batch {batch}", [*inference("cuda", batch), "--cuda-graph"], 300))
    train_step = ["bench/train_step.py", "--device", "cuda", "--preset", "r50", "--batch-size", "2"]
    train_step += ["--set", "model.backbone_weights=null"]
    compiled = []
    for amp in ("off", "bf16"):
        for compile_ in (False, True):
            name = f"train step {'fp32' if amp == 'off' else amp}{' compiled' if compile_ else ''}"
            argv = [*train_step, "--amp", amp, "--json", str(out / f"{slug(name)}.json")]
            (compiled if compile_ else steps).append(Spec(name, argv + ["--compile"] * compile_, 400))
    demo = ["--preset", "demo", "--set", "train.epochs=1", "--set", "train.num_workers=1"]
    demo += ["--set", "train.use_gpu=true", "--set", f"train.storage_path={out}", "--set", "train.name=ray_demo"]
    steps.append(Spec("ray train demo", ["pipelines/train.py", *demo], 400))
    steps.append(Spec("infer on its checkpoint", [*infer, "--input", "data/demo/val", "--gpus-per-actor", "1"], 300))
    return steps + compiled


def run_own_step(name: str, dry_run: bool, out: Path, json_path: str) -> int:
    """``--step NAME --json PATH``: one of this file's own steps, in this process; its details to PATH."""
    device = "cpu" if dry_run else "cuda"
    if name == "GPU step arguments":
        ok, summary, details = check_arguments(specs(False, out))
    elif name == "model parity":
        ok, summary, details = model_parity(device, dry_run)
    elif name == "bf16 loss curve":
        ok, summary, details = loss_curves(device, dry_run)
    else:
        print(f"bench/gpu_check.py: unknown --step {name!r}", file=sys.stderr)
        return 2
    Path(json_path).write_text(json.dumps(details, indent=2))
    print(summary)
    return 0 if ok else 1


def environment() -> dict[str, str]:
    """What the figures ran on beside the device: Python, torch, and on a GPU CUDA, cuDNN and the driver."""
    import platform

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        found.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()))
        try:
            from ops.cuda import build

            found["driver"] = build.driver_status()[1]
        except Exception as exc:  # no NVRTC: `ops info`, the first step, says why
            found["driver"] = f"unknown ({type(exc).__name__}: {exc})"
    return found


def markdown(steps: list[Step], device: str, env: dict[str, str]) -> str:
    lines = [f"# GPU check on {device}", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["| step | result | seconds | summary |", "|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.result} | {s.seconds:.0f} | {s.summary} |")
    return "\n".join(lines) + "\n"


def earlier_steps(out: Path, device: str) -> dict[str, Step]:
    """The rows of the report already in ``out`` (on this device), by step name, for ``--only``."""
    path = out / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    if report.get("device") != device:
        return {}
    names = {f.name for f in fields(Step)}
    return {s["name"]: Step(**{k: v for k, v in s.items() if k in names}) for s in report["steps"]}


def write_report(out: Path, steps: list[Step], device: str, env: dict[str, str], budget_s: float) -> str:
    """report.md and report.json, each replaced whole (written beside, then renamed)."""
    table = markdown(steps, device, env)
    report = {"device": device, "environment": env, "budget_s": budget_s}
    report["steps"] = [{**asdict(s), "result": s.result} for s in steps]
    for name, text in (("report.md", table), ("report.json", json.dumps(report, indent=2))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    p.add_argument("--out", default="gpu_report", help="report folder (default gpu_report)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for all the steps (default 480)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="STEP",
        help="run these steps alone (names as in the table); the report keeps the other rows it had",
    )
    # One of this file's own steps, run by the check itself in its own process.
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        return run_own_step(args.step, args.dry_run, out, args.json)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); --dry-run runs on the CPU")
        return 2
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    found = environment()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not args.dry_run:
        env["MSDA_BACKEND"] = "cuda"

    todo = specs(args.dry_run, out)
    kept: dict[str, Step] = {}
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in todo})
        if unknown:
            p.error(f"--only: no step named {', '.join(map(repr, unknown))}; the steps: {[s.name for s in todo]}")
        kept = {n: s for n, s in earlier_steps(out, device).items() if n not in args.only}
        todo = [s for s in todo if s.name in args.only]

    def report() -> str:
        ran = {s.name: s for s in steps}
        rows = [ran.get(s.name) or kept.get(s.name) for s in specs(args.dry_run, out)]
        return write_report(out, [r for r in rows if r is not None], device, found, args.budget_s)

    deadline = time.monotonic() + args.budget_s
    steps: list[Step] = []
    signal.signal(signal.SIGTERM, _request_stop)
    for i, spec in enumerate(todo):
        left = deadline - time.monotonic()
        if _stop_signal is not None or left < MIN_STEP_S:
            why = f"stopped by signal {_stop_signal}" if _stop_signal else f"the {args.budget_s:.0f} s budget was spent"
            steps += [Step(s.name, False, 0.0, why, ran=False) for s in todo[i:]]
            break
        steps.append(run_step(spec, env, out, min(spec.timeout_s, left)))
        report()
    table = report()
    print(table)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
