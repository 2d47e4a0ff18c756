"""COCO AP of any checkpoint core/ can load (ours or the authors') on a COCO-format split, on Ray workers.

    python pipelines/evaluate.py --checkpoint runs/demo-.../checkpoint_epoch0011 --data data/demo \\
        --set data.val_ann=instances_val.json --set data.val_images=val
    python pipelines/evaluate.py --checkpoint r50_deformable_detr-checkpoint.pth \\
        --data /data/coco --num-workers 4 --use-gpu
    python pipelines/evaluate.py --checkpoint s3://bucket/runs/x/checkpoint_epoch0049 \\
        --ann s3://bucket/custom/val.json --images s3://bucket/custom/val --out eval_out

The workers run inference on shards of the val split (the same code path as training's evaluation),
rank 0 gathers the detections and scores them with pycocotools. A checkpoint of ours brings its own
data settings (category mapping, image size, normalization); the authors' use the paper's (raw COCO
category ids, short side 800).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python pipelines/evaluate.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import logging
import shutil
import tempfile
import time
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from core.checkpoint import Checkpoint, read_checkpoint
from core.coco_eval import AP_KEYS, format_ap_table
from pipelines.config import ConfigError, JobConfig, deep_merge, parse_override, validate_job_config
from pipelines.preflight import PreflightError, check_data, with_timeout
from pipelines.run_outputs import (
    AP_TABLE_FILE,
    DATA_REPORT_FILE,
    MetricsSink,
    RunDir,
    data_report,
    draw_detections,
    format_data_report,
)
from pipelines.train import WORKER_RUNTIME_ENV, DetectionDataConfig, connect_ray, dataset_info, describe_failure
from pipelines.train_worker import eval_loop_per_worker, fetch_checkpoint_file

log = logging.getLogger(__name__)


def load_for_eval(uri: str, timeout_s: float = 120.0) -> Checkpoint:
    """Reads a checkpoint (file or run checkpoint folder; local, http(s), s3://, gs://) on the driver."""
    tmp = tempfile.mkdtemp(prefix="ddetr-evalckpt-")
    try:
        path = with_timeout(lambda: fetch_checkpoint_file(uri, tmp), timeout_s, f"--checkpoint {uri!r}")
        return read_checkpoint(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise PreflightError(f"--checkpoint {uri!r} cannot be loaded: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def eval_job_config(ckpt: Checkpoint, args: argparse.Namespace) -> JobConfig:
    """The JobConfig of an evaluation: the checkpoint's model, its data settings (ours) and the command line."""
    job: dict[str, Any] = {}
    if ckpt.meta.get("job_config"):
        saved = json.loads(ckpt.meta["job_config"])
        job["data"] = saved.get("data", {})
        job["train"] = {"amp": saved.get("train", {}).get("amp", "auto")}
    else:
        # The authors' checkpoints: raw COCO category ids, the paper's evaluation size.
        job["data"] = {"category_ids": "raw"}
    detr = ckpt.config.model_dump(mode="json")
    job.update(model=detr["model"], matcher=detr["matcher"], loss=detr["loss"])
    data = job["data"]
    if args.data is not None:
        data["root"] = args.data
    if args.ann is not None:
        data["val_ann"] = args.ann
    if args.images is not None:
        data["val_images"] = args.images
    data["parquet_dir"] = None if args.data or args.ann or args.images else data.get("parquet_dir")
    job = deep_merge(
        job,
        {
            "train": {
                "num_workers": args.num_workers,
                "use_gpu": args.use_gpu,
                "eval_every": 1,
                "num_vis_images": args.num_vis,
                "name": "evaluate",
                **({"eval_batch_size": args.batch_size} if args.batch_size else {}),
            }
        },
    )
    for item in args.overrides:
        path, value = parse_override(item)
        node = job
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return validate_job_config(job)


def run_evaluation(
    job: JobConfig, ckpt: Checkpoint, *, out_dir: str | None = None, address: str | None = None
) -> dict[str, float]:
    """Evaluates ``ckpt`` on ``job.data``'s val split with ``job.train.num_workers`` Ray workers.

    Prints the data report (bad input skipped with data.on_bad_input=skip) at the end and writes
    it to ``out_dir``/data_report.json with the AP table.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl", "num_eval_images", "eval_time_s"}.

    Raises:
        ray.train.TrainingFailedError: a worker or Ray Train's controller failed.
    """
    from pipelines.coco import BadInputError
    from pipelines.data import build_dataset

    if "://" not in job.data.root:
        job = job.model_copy(update={"data": job.data.model_copy(update={"root": os.path.abspath(job.data.root)})})
    check_data(job.model_copy(update={"train": job.train.model_copy(update={"eval_every": 1})}), splits=("val",))
    connect_ray(job, address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        val_ds, val_info = build_dataset(job.data, "val")
    except (BadInputError, OSError, ValueError) as e:
        raise PreflightError(f"cannot read the val split: {e}") from e
    if job.model.num_classes < val_info.num_classes:
        raise PreflightError(
            f"the checkpoint's head has {job.model.num_classes} classes but the data needs {val_info.num_classes} "
            f"(data.category_ids={job.data.category_ids!r}); for the authors' COCO checkpoints keep "
            "data.category_ids=raw"
        )
    info = dataset_info(val_info.categories, job.model.num_classes, 0, val_info.num_images)
    sink = MetricsSink.remote()
    # Ray Train's run state only: the outputs go to out_dir.
    storage = tempfile.mkdtemp(prefix="ddetr-eval-")
    report = None
    try:
        stats = _fit(job, ckpt, val_ds, info, sink, storage)
        report = data_report({"val": val_info})  # with the images skipped while decoding
        if out_dir is not None:
            run = RunDir(os.path.dirname(os.path.abspath(out_dir)) or ".", os.path.basename(os.path.abspath(out_dir)))
            run.mkdir()
            run.write_text(AP_TABLE_FILE, format_ap_table(stats) + "\n")
            run.write_json("metrics.json", {k: stats[k] for k in (*AP_KEYS, "num_eval_images") if k in stats})
            run.write_json(DATA_REPORT_FILE, report)
            for i, item in enumerate(ray.get(sink.vis.remote())):
                draw_detections(item, run.file(f"val_images/{i:02d}_image{item['image_id']}.png"))
    finally:
        # Printed after a failure too: skipped input may explain it.
        print(format_data_report(report or data_report({"val": val_info}), job.data.on_bad_input), flush=True)
        ray.kill(sink)
        shutil.rmtree(storage, ignore_errors=True)
    return stats


def _fit(
    job: JobConfig, ckpt: Checkpoint, val_ds: ray.data.Dataset, info: dict[str, Any], sink, storage: str
) -> dict[str, float]:
    from pipelines.data import ingest_options

    t = job.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "dataset_info": info,
            # Through the object store: workers on any node get the weights without shared storage.
            "weights": ray.put(ckpt.model),
            "sink": sink,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            worker_runtime_env=WORKER_RUNTIME_ENV,
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
        datasets={"val": val_ds},
        dataset_config=DetectionDataConfig(datasets_to_split=[], execution_options=ingest_options()),
    )
    result = trainer.fit()  # Train V2 raises TrainingFailedError itself
    if result.error is not None:
        raise result.error
    evals = [r for r in ray.get(sink.drain.remote()) if r.get("kind") == "eval"]
    if not evals:
        raise RuntimeError("the evaluation workers finished without reporting an AP")
    return {k: v for k, v in evals[-1].items() if k not in ("kind", "time")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="COCO AP of a checkpoint on a COCO-format split, on Ray workers.")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint file or run checkpoint folder: path, http(s), s3://, gs://"
    )
    p.add_argument("--data", help="dataset root (data.root); val_ann and val_images resolve against it")
    p.add_argument("--ann", help="instances JSON of the split (data.val_ann)")
    p.add_argument("--images", help="image folder of the split (data.val_images)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--batch-size", type=int, help="images per worker batch (default data.batch_size_per_worker)")
    p.add_argument("--num-vis", type=int, default=4, help="validation images drawn into --out")
    p.add_argument("--out", help="folder for ap_table.md, metrics.json, data_report.json and drawn images")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. data.val_short_side=800 or data.category_ids=contiguous",
    )
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        ckpt = load_for_eval(args.checkpoint)
        job = eval_job_config(ckpt, args)
        print(
            f"checkpoint {args.checkpoint}: {ckpt.source_format}, {ckpt.config.variant()} "
            f"{job.model.backbone}, {job.model.num_classes} classes",
            flush=True,
        )
        stats = run_evaluation(job, ckpt, out_dir=args.out, address=args.address)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except ray.train.TrainingFailedError as e:
        print(f"error: evaluation failed: {describe_failure(e)}", file=sys.stderr, flush=True)
        return 1
    print(f"\nCOCO AP on {stats.get('num_eval_images', '?')} images of {job.data.ann_uri('val')}:", flush=True)
    print(format_ap_table(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
