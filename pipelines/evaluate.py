"""COCO AP of any checkpoint core/ can load (ours or the authors') on a COCO-format split (entry script).

    python pipelines/evaluate.py --checkpoint runs/demo-... --data data/demo \\
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

import ray.train

from core.checkpoint import Checkpoint
from core.evaluation import format_ap_table
from pipelines.console import console_logging
from pipelines.job_config import ConfigError, JobConfig, eval_job_config
from pipelines.raytrain.cluster import quiet_ray_warnings
from pipelines.raytrain.errors import describe_failure
from pipelines.raytrain.evaluation import resolve_out, run_evaluation
from pipelines.raytrain.preflight import PreflightError, open_checkpoint_arg


def config_from_args(ckpt: Checkpoint, args: argparse.Namespace) -> JobConfig:
    """The evaluation's JobConfig: the checkpoint's model and data settings, then the command line."""
    return eval_job_config(
        ckpt,
        data_root=args.data,
        ann=args.ann,
        images=args.images,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        batch_size=args.batch_size,
        num_vis=args.num_vis,
        overrides=args.overrides,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="COCO AP of a checkpoint on a COCO-format split, on Ray workers.")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file, checkpoint folder, or run directory (its best checkpoint): path, http(s), s3://, gs://",
    )
    p.add_argument("--data", help="dataset root (data.root); val_ann and val_images resolve against it")
    p.add_argument("--ann", help="instances JSON of the split (data.val_ann)")
    p.add_argument("--images", help="image folder of the split (data.val_images)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--batch-size", type=int, help="images per worker batch (default data.batch_size_per_worker)")
    p.add_argument("--num-vis", type=int, default=4, help="validation images drawn into --out")
    p.add_argument(
        "--out", help="folder or bucket prefix for ap_table.md, metrics.json, data_report.json and drawn images"
    )
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
    console_logging()
    quiet_ray_warnings()
    args = parse_args(argv)
    for flag, value, least in (("--num-workers", args.num_workers, 1), ("--batch-size", args.batch_size, 1)):
        if value is not None and value < least:
            print(f"error: {flag} must be >= {least}, got {value}", file=sys.stderr, flush=True)
            return 2
    try:
        out = resolve_out(args.out) if args.out else None
        checkpoint, ckpt = open_checkpoint_arg(args.checkpoint, "evaluate")
        job = config_from_args(ckpt, args)
        print(
            f"checkpoint {checkpoint.partition('?')[0]}: {ckpt.source_format}, {ckpt.config.variant()} "
            f"{job.model.backbone}, {job.model.num_classes} classes",
            flush=True,
        )
        stats = run_evaluation(job, ckpt, out_dir=out, address=args.address)
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
