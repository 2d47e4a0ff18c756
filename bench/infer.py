"""Images/s of the batch-inference job (pipelines/infer.py) against a plain PyTorch loop over the same images.

The loop reads, decodes and resizes each image and runs the same Predictor on batches of the same size,
in one process whose torch uses every core given (``--cores``); the job runs on a local Ray with that
many CPUs: decode tasks overlapping one model actor (or ``--gpus-per-actor`` GPU actors). Rounds
alternate between the two so both see the same background load. The job's rate includes its start-up
(Ray Data's plan, decode workers and the actor importing torch, the actor building its model), a fixed
cost that more images (``--num-images``) amortize; the loop's runs from its first image, its model
built beforehand. Both are also given after their first rows (the job's rate once its pipeline is full,
which is what a job over millions of images runs at), with the job's start-up in seconds.
Images per CPU-second (every process of the job counted: driver, Ray's daemons, decode tasks, actors)
say how much CPU the job's machinery costs, whatever else a shared machine runs. With a GPU, the
device's busy fraction over the job is sampled with nvidia-smi.

    python bench/infer.py                          # CPU: ResNet-50 model, 480-px images
    python bench/infer.py --gpus-per-actor 1 --image-size 800 --num-images 512 --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import DetrConfig, ModelConfig, build_model, save_checkpoint
from core.predictor import InputSize, Predictor, prepare_image
from pipelines.data.decode import decode_image
from pipelines.data.synthetic import generate_coco
from pipelines.presets import PRESETS
from pipelines.storage import read_bytes


class GpuBusy:
    """Samples nvidia-smi's utilization.gpu (percent of time a kernel ran) every 100 ms while running."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                continue

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    def busy_fraction(self) -> float | None:
        return float(np.mean(self.samples)) / 100 if self.samples else None


def _process_tree_cpu_seconds() -> dict[int, float]:
    """utime + stime of this process and every descendant (Ray's daemons and workers), by pid (Linux)."""
    parents, cpu = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(d)] = int(fields[1])
            cpu[int(d)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return {p: cpu[p] for p in tree if p in cpu}


class CpuMeter:
    """CPU seconds used by this process tree while running; sampled every 0.2 s, so that processes which
    exit before the end (Ray Data's actors) still count up to their last sample.

    ``seconds`` is the total; ``daemon_seconds`` the part of Ray's own daemons (raylet, GCS, dashboard
    agents), which poll at a steady rate whatever the job does, so their share grows with wall time
    (a loaded machine's); the rest is this driver and the Ray workers (``ray::`` decode tasks, actors).
    """

    def __enter__(self) -> CpuMeter:
        self.before = _process_tree_cpu_seconds()
        self.last = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.last.update(_process_tree_cpu_seconds())

    @staticmethod
    def _is_daemon(pid: int) -> bool:
        if pid == os.getpid():
            return False
        try:
            return not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
        except OSError:
            return False  # a worker that already exited (daemons live as long as Ray)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(_process_tree_cpu_seconds())
        used = {p: t - self.before.get(p, 0.0) for p, t in self.last.items()}
        self.seconds = sum(used.values())
        self.daemon_seconds = sum(t for p, t in used.items() if self._is_daemon(p))


def plain_loop(files: list[str], predictor: Predictor, batch_size: int) -> dict[str, float]:
    """Read + decode + resize + model, one batch after the other, in this process."""
    start, cpu_start = time.perf_counter(), time.process_time()
    detections, first = 0, None
    for i in range(0, len(files), batch_size):
        prepared = [
            prepare_image(decode_image(read_bytes(f), name=f), predictor.input_size) for f in files[i : i + batch_size]
        ]
        detections += sum(len(d.scores) for d in predictor.predict_prepared(prepared))
        first = first or time.perf_counter()
    end = time.perf_counter()
    wall, cpu = end - start, time.process_time() - cpu_start
    steady = (len(files) - batch_size) / (end - first) if len(files) > batch_size else float("nan")
    return {
        "images_per_s": len(files) / wall,
        "steady_images_per_s": steady,
        "images_per_cpu_s": len(files) / cpu,
        "detections": detections,
    }


def job_round(args: argparse.Namespace, checkpoint: str, images: str, out: str) -> dict[str, Any]:
    from pipelines.inference.job import InferenceConfig, run_inference

    cfg = InferenceConfig(
        checkpoint=checkpoint,
        input=images,
        output=out,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        image_size=args.image_size,
        max_size=args.max_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        torch_threads=None if args.gpus_per_actor else args.cores,
        bf16=args.bf16,
        images_per_part=4 * args.decode_batch,
        decode_batch=args.decode_batch,
        progress_every_s=1e9,
    )
    with GpuBusy() as gpu, CpuMeter() as cpu:
        summary = run_inference(cfg)
    summary["gpu_busy_fraction"] = gpu.busy_fraction()
    summary["images_per_cpu_s"] = summary["images_this_run"] / cpu.seconds
    summary["images_per_work_cpu_s"] = summary["images_this_run"] / (cpu.seconds - cpu.daemon_seconds)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--size", default="480x640", help="HxW of the generated JPEGs")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=480, help="short side the model sees")
    p.add_argument("--max-size", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--decode-batch", type=int, default=4)
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs of the Ray instance = the loop's threads")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="job and loop rounds, alternating")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument(
        "--smoke", action="store_true", help="the tiny preset's model, 4 images of 64x96, 1 round: checks it runs"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.num_images, args.size, args.image_size, args.max_size, args.rounds = 4, "64x96", 64, 96, 1

    import ray

    device = "cuda" if args.gpus_per_actor and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.cores)
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        h, w = (int(v) for v in args.size.split("x"))
        root = generate_coco(Path(tmp) / "coco", 0, args.num_images, image_size=(h, w), crowd_fraction=0.0)["root"]
        images = str(Path(root) / "val")
        files = sorted(str(f) for f in Path(images).iterdir())
        for f in files:  # warm the page cache: neither side should pay the first disk read
            Path(f).read_bytes()
        sizes = PRESETS["tiny"]["model"] if args.smoke else {"backbone": args.backbone, "num_classes": 91}
        cfg = DetrConfig(model=ModelConfig(**sizes))
        model, _, _ = build_model(cfg, load_backbone_weights=False)
        checkpoint = os.path.join(tmp, "checkpoint.pt")
        save_checkpoint(checkpoint, model, cfg)
        predictor = Predictor(
            model,
            input_size=InputSize(short_side=args.image_size, max_size=args.max_size),
            score_threshold=args.score_threshold,
            batch_size=args.batch_size,
            device=device,
            amp_dtype=torch.bfloat16 if args.bf16 else None,
        )
        predictor.predict_prepared([predictor.prepare(decode_image(read_bytes(files[0])))])  # warm-up

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=args.cores, num_gpus=1 if device == "cuda" else 0, include_dashboard=False, log_to_driver=False
        )
        jobs, loops = [], []
        try:
            for r in range(args.rounds):
                jobs.append(job_round(args, checkpoint, images, os.path.join(tmp, f"out{r}")))
                loops.append(plain_loop(files, predictor, args.batch_size))
                print(
                    f"round {r}: job {jobs[-1]['images_per_s']:.2f} images/s ({jobs[-1]['steady_images_per_s']:.2f} "
                    f"after its first rows at {jobs[-1]['first_rows_s']:.1f} s), "
                    f"{jobs[-1]['images_per_cpu_s']:.3f} per CPU-second ({jobs[-1]['images_per_work_cpu_s']:.3f} "
                    f"without Ray's daemons); loop {loops[-1]['images_per_s']:.2f} images/s "
                    f"({loops[-1]['steady_images_per_s']:.2f} after its first batch), "
                    f"{loops[-1]['images_per_cpu_s']:.3f} per CPU-second",
                    flush=True,
                )
        finally:
            ray.shutdown()

    def med(xs: list[dict], key: str) -> float:
        return float(np.median([x[key] for x in xs]))

    figures = {
        "device": device,
        "cores": args.cores,
        "num_images": args.num_images,
        "image_size": [args.image_size, args.max_size],
        "backbone": cfg.model.backbone,
        "batch_size": args.batch_size,
        "loop_images_per_s": med(loops, "images_per_s"),
        "job_images_per_s": med(jobs, "images_per_s"),
        "loop_steady_images_per_s": med(loops, "steady_images_per_s"),
        "job_steady_images_per_s": med(jobs, "steady_images_per_s"),
        "job_first_rows_s": med(jobs, "first_rows_s"),
        "loop_images_per_cpu_s": med(loops, "images_per_cpu_s"),
        "job_images_per_cpu_s": med(jobs, "images_per_cpu_s"),
        "job_images_per_work_cpu_s": med(jobs, "images_per_work_cpu_s"),
        "gpu_busy_fraction": jobs[-1]["gpu_busy_fraction"],
    }
    figures["ratio_per_cpu_s"] = figures["job_images_per_cpu_s"] / figures["loop_images_per_cpu_s"]
    figures["ratio_per_work_cpu_s"] = figures["job_images_per_work_cpu_s"] / figures["loop_images_per_cpu_s"]
    figures["ratio"] = figures["job_images_per_s"] / figures["loop_images_per_s"]
    figures["steady_ratio"] = figures["job_steady_images_per_s"] / figures["loop_steady_images_per_s"]
    figures["same_detections"] = all(j["detections_this_run"] == loops[0]["detections"] for j in jobs)
    print(
        f"batch inference, {args.num_images} images {args.size} -> {args.image_size}px, {cfg.model.backbone}, {device}, "
        f"{args.cores} cores: loop {figures['loop_images_per_s']:.2f} images/s; job "
        f"{figures['job_images_per_s']:.2f} images/s ({figures['ratio']:.2f}x the loop); after the first rows "
        f"(the job's at {figures['job_first_rows_s']:.1f} s): {figures['steady_ratio']:.2f}x; "
        f"images per CPU-second: job/loop {figures['ratio_per_cpu_s']:.2f}x "
        f"({figures['ratio_per_work_cpu_s']:.2f}x without Ray's daemons)"
        + (f"; GPU busy {figures['gpu_busy_fraction']:.0%}" if figures["gpu_busy_fraction"] is not None else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
