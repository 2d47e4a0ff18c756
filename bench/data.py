"""Images/s through read, decode, augment and batch: the Ray Data pipeline against a torch DataLoader.

Both sides read the same JPEG files, run the same `make_sample` (decode + the paper's training
augmentation), the same collate and the same pad + normalize (`to_model_batch`) in the consumer, with
the same number of worker processes. Their epochs alternate, so both see the same background load,
and each epoch's CPU time is summed over every process involved (Ray's own daemons included), which
gives images per CPU-second: how many cores feed one GPU, whatever else the machine is doing.
Each epoch's rate is reported whole and from its first batch on (without the start-up that each Ray
Data execution pays and persistent DataLoader workers mostly don't; while both sides' prefetched
batches drain it reads high). Longer epochs (`--num-images`) bring both towards the steady state.
Ray Data runs with the training defaults (read and decode fused into one task per unit);
`ray.init(num_cpus=workers)` is what caps it at `workers` cores.
Run: `python bench/data.py` (Linux: CPU time is read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.data.batching import collate_table, iter_batches, samples_to_table, to_model_batch
from pipelines.data.categories import CategoryMap
from pipelines.data.data_config import DataConfig
from pipelines.data.datasets import build_dataset
from pipelines.data.index import load_index
from pipelines.data.sample import make_sample
from pipelines.data.synthetic import generate_coco
from pipelines.storage import read_bytes

_TICK = os.sysconf("SC_CLK_TCK")


def _process_tree() -> dict[int, str]:
    """This process and its descendants: pid -> command line."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    out = {}
    for pid in tree:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return out


class _CpuMeter:
    """CPU seconds used by this process plus the descendants `select` picks, between start and stop."""

    def __init__(self, select):
        self.select = select

    def __enter__(self) -> _CpuMeter:
        self.before = _cpu_seconds(self._pids())
        return self

    def _pids(self) -> list[int]:
        return [p for p, cmd in _process_tree().items() if p == os.getpid() or self.select(cmd)]

    def __exit__(self, *exc) -> None:
        after = _cpu_seconds(self._pids())
        self.seconds = sum(t - self.before.get(p, 0.0) for p, t in after.items())


def _is_dataloader_worker(cmd: str) -> bool:
    return "multiprocessing" in cmd


class _TorchDataset(torch.utils.data.Dataset):
    """The DataLoader baseline: one file read + make_sample per (epoch, index) item."""

    def __init__(self, cfg: DataConfig, rows: list[dict[str, Any]], categories: CategoryMap):
        self.cfg, self.rows, self.categories = cfg, rows, categories
        self.images_uri = cfg.images_uri("train")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, i = item
        row = self.rows[i]
        data = read_bytes(f"{self.images_uri}/{row['file_name']}")
        return make_sample(
            data, row, categories=self.categories, cfg=self.cfg, augment=True, keep_crowd=False, epoch=epoch
        )


class _EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch; items carry the epoch so persistent workers augment for it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return iter([(self.epoch, int(i)) for i in order])


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return collate_table(samples_to_table(samples))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # as in the Ray tasks


def _timed(model_batches) -> tuple[int, float, float]:
    """Images, images/s over the whole epoch, and images/s from the first batch's arrival on (nan with one)."""
    t0, n, first, n_first = time.perf_counter(), 0, None, 0
    for b in model_batches:
        n += b["images"].shape[0]
        if first is None:
            first, n_first = time.perf_counter(), n
    t1 = time.perf_counter()
    steady = (n - n_first) / (t1 - first) if first is not None and n > n_first else float("nan")
    return n, n / (t1 - t0), steady


def _operators(ds) -> list[str]:
    """The executed Ray Data operators, fused ones joined by "->" (from the last execution's stats)."""
    # "Operator 1 ReadRange->MapBatches(_ReadUnits): ..." -> "ReadRange->MapBatches(_ReadUnits)"
    return [line.split(":", 1)[0].split(" ", 2)[-1] for line in ds.stats().splitlines() if line.startswith("Operator")]


def run(cfg: DataConfig, workers: int, batch_size: int, epochs: int) -> tuple[dict[str, list[float]], list[str]]:
    """Alternating epochs of both pipelines.

    Returns:
        Per epoch and side ("dataloader", "ray"): images/s, images/s after the first batch ("_steady"),
        images per CPU-second ("_cpu"); and the Ray Data operators that ran.
    """
    import ray

    index = load_index(cfg, "train")
    ds_torch = _TorchDataset(
        cfg, index.table.to_pylist(), CategoryMap.from_categories(index.categories, cfg.category_ids)
    )
    sampler = _EpochSampler(len(ds_torch), cfg.seed)
    # spawn: forking a process that runs Ray's gRPC threads is unsafe.
    loader = torch.utils.data.DataLoader(
        ds_torch,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init,
        prefetch_factor=4,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=1024 * 1024**2)
    out: dict[str, list[float]] = {f"{side}{k}": [] for side in ("dataloader", "ray") for k in ("", "_steady", "_cpu")}
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds_ray, _ = build_dataset(cfg, "train")  # num_decode_workers=None, as in training: one fused stage
        for epoch in range(epochs):
            sampler.epoch = epoch
            with _CpuMeter(_is_dataloader_worker) as cpu:
                n, rate, steady = _timed(
                    to_model_batch(b, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std) for b in loader
                )
            out["dataloader"].append(rate)
            out["dataloader_steady"].append(steady)
            out["dataloader_cpu"].append(n / cpu.seconds)
            with _CpuMeter(lambda cmd: not _is_dataloader_worker(cmd)) as cpu:
                n, rate, steady = _timed(
                    iter_batches(
                        ds_ray,
                        batch_size,
                        cfg.seed,
                        epoch,
                        device="cpu",
                        pixel_mean=cfg.pixel_mean,
                        pixel_std=cfg.pixel_std,
                        prefetch_batches=4,
                    )
                )
            out["ray"].append(rate)
            out["ray_steady"].append(steady)
            out["ray_cpu"].append(n / cpu.seconds)
        operators = _operators(ds_ray)
    finally:
        ray.shutdown()
    return out, operators


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a generated dataset to reuse (default: generate one in a temp dir)")
    p.add_argument("--num-images", type=int, default=512, help="images per epoch (more: a longer steady state)")
    p.add_argument("--size", default="480x640", help="HxW of generated images (COCO's typical 480x640)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decode processes on each side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4, help="the first (start-up) is reported but not averaged")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the consumer's pad + normalize shouldn't take the workers' cores

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            h, w = (int(v) for v in args.size.split("x"))
            root = generate_coco(
                Path(tmp) / "coco",
                args.num_images,
                0,
                image_size=(h, w),
                num_classes=8,
                max_objects=13,
                empty_fraction=0.01,
                crowd_fraction=0.0,
                seed=0,
            )["root"]
        cfg = DataConfig(
            root=root,
            train_images="train",
            val_images="val",
            train_ann="instances_train.json",
            val_ann="instances_val.json",
        )
        js = json.loads(Path(root, "instances_train.json").read_text())
        for im in js["images"]:  # warm the page cache so neither side pays the first disk read
            Path(root, "train", im["file_name"]).read_bytes()
        r, operators = run(cfg, args.workers, args.batch_size, args.epochs)

    def steady(xs: list[float]) -> float:
        return float(np.median(xs[1:] if len(xs) > 1 else xs))

    result = {
        "images": len(js["images"]),
        "boxes_per_image": round(len(js["annotations"]) / max(1, len(js["images"])), 2),
        "image_size": args.size,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "load_average_1min_at_end": os.getloadavg()[0],
        "ray_operators": operators,
        **{f"{k}_by_epoch": [round(v, 1) for v in vs] for k, vs in r.items()},
        "dataloader_images_per_s": round(steady(r["dataloader"]), 1),
        "ray_images_per_s": round(steady(r["ray"]), 1),
        "dataloader_images_per_s_after_first_batch": round(steady(r["dataloader_steady"]), 1),
        "ray_images_per_s_after_first_batch": round(steady(r["ray_steady"]), 1),
        "dataloader_images_per_cpu_s": round(steady(r["dataloader_cpu"]), 1),
        "ray_images_per_cpu_s": round(steady(r["ray_cpu"]), 1),
    }
    result["ray_over_dataloader"] = round(result["ray_images_per_s"] / result["dataloader_images_per_s"], 3)
    result["ray_over_dataloader_after_first_batch"] = round(
        result["ray_images_per_s_after_first_batch"] / result["dataloader_images_per_s_after_first_batch"], 3
    )
    result["ray_over_dataloader_per_cpu_s"] = round(
        result["ray_images_per_cpu_s"] / result["dataloader_images_per_cpu_s"], 3
    )
    w = args.workers
    print(
        f"{result['images']} images {args.size}, {result['boxes_per_image']} boxes/image, {w} worker processes "
        f"each side, batch {args.batch_size}; median of epochs 2..{args.epochs}; "
        f"Ray Data operators: {', '.join(operators)}:"
    )
    for name, key in (("torch DataLoader", "dataloader"), ("Ray Data", "ray")):
        print(
            f"  {name:17s}: {result[key + '_images_per_s']:7.1f} images/s whole epoch "
            f"({result[key + '_images_per_s_after_first_batch']:7.1f} after the first batch) = "
            f"{result[key + '_images_per_s'] / w:6.1f} per worker core; "
            f"{result[key + '_images_per_cpu_s']:6.1f} images per CPU-second (all its processes)"
        )
    print(
        f"  Ray / DataLoader : {result['ray_over_dataloader']:.2f}x images/s "
        f"({result['ray_over_dataloader_after_first_batch']:.2f}x after the first batch), "
        f"{result['ray_over_dataloader_per_cpu_s']:.2f}x per CPU-second "
        f"(1-min load average at the end: {result['load_average_1min_at_end']:.1f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
