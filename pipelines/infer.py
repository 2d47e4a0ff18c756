"""Batch inference over an image folder, a bucket prefix or a manifest, on a Ray actor pool; resumable.

    python pipelines/infer.py --checkpoint runs/demo-<time> --input data/demo/val --output out/
    python pipelines/infer.py --checkpoint runs/demo --input data/demo/val --output out/   # the run's best
    python pipelines/infer.py --checkpoint r50_deformable_detr-checkpoint.pth --input s3://bucket/images \\
        --output s3://bucket/detections --actors 4 --gpus-per-actor 1 --bf16 --glob '*.jpg'
    ray job submit --working-dir . -- python pipelines/infer.py --checkpoint s3://... --input manifest.txt ...
    python pipelines/infer.py --engine onnxruntime --model model.onnx --input data/demo/val --output out/

Rerunning the same command resumes: only images without a row are processed; over a finished output it
changes nothing. Output layout: see pipelines/inference/outputs.py.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python pipelines/infer.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json

from pydantic import ValidationError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        help="checkpoint file, checkpoint folder, or a run directory for its best checkpoint, else its latest "
        "(local, s3, gs, http)",
    )
    p.add_argument(
        "--engine",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="torch: run --checkpoint; onnxruntime: run --model, an ONNX file of pipelines/export.py, on the CPU",
    )
    p.add_argument("--model", help="the ONNX file (local, s3, gs, http) of --engine onnxruntime")
    p.add_argument("--input", required=True, help="image folder, s3:// or gs:// prefix, or a .txt/.parquet manifest")
    p.add_argument("--output", required=True, help="output folder or s3:// / gs:// prefix")
    p.add_argument("--score-threshold", type=float, default=0.05, help="keep detections scoring above this")
    p.add_argument("--top-k", type=int, default=100, help="most detections per image")
    p.add_argument("--image-size", type=int, default=None, help="short side (default: the checkpoint's, 800)")
    p.add_argument("--max-size", type=int, default=None, help="long side cap (default: scaled with --image-size)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call")
    p.add_argument("--actors", type=int, default=1, help="model replicas (actor pool size)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="0: CPU inference")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--torch-threads", type=int, default=None, help="CPU actors' threads (default: their share)")
    p.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")
    p.add_argument("--pad-mixed-sizes", action="store_true", help="batch different sizes together, padded")
    p.add_argument("--glob", default=None, help="only files matching, e.g. '*.jpg' (default: every file)")
    p.add_argument(
        "--no-exif-transpose",
        dest="exif_transpose",
        action="store_false",
        help="keep photos as stored, ignoring their EXIF orientation (boxes in the stored pixels' frame)",
    )
    p.add_argument("--coco-json", action="store_true", help="also write _detections_coco.json (COCO results)")
    p.add_argument("--coco-ann", default=None, help="instances JSON giving image ids by file name (--coco-json)")
    p.add_argument("--draw", type=int, default=0, metavar="N", help="draw the boxes on the first N images")
    p.add_argument("--draw-threshold", type=float, default=0.5)
    p.add_argument("--images-per-part", type=int, default=1000, help="images per output file (unit of resumption)")
    p.add_argument("--decode-batch", type=int, default=16, help="images per decode task")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs one decode task reserves")
    p.add_argument("--read-threads", type=int, default=16, help="concurrent reads in one decode task")
    p.add_argument("--progress-every-s", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--summary-json", default=None, help="also write the run's summary to this local file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.inference.job import InferenceConfig, run_inference
    from pipelines.inference.outputs import OutputError
    from pipelines.inference.sources import InputError

    options = {k: v for k, v in vars(args).items() if k != "summary_json"}
    try:
        cfg = InferenceConfig(**options)
    except ValidationError as e:
        err = e.errors()[0]
        where = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""  # a whole-config check: no field
        print(f"infer: {where}{err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    try:
        summary = run_inference(cfg)
    except (InputError, OutputError, ValueError) as e:
        print(f"infer: {e}", file=sys.stderr)
        return 2
    failed = ", ".join(f"{k} {n}" for k, n in summary["failed_this_run"].items()) or "none"
    print(
        f"infer: done {summary['images_done']}/{summary['images_total']} images "
        f"({summary['images_this_run']} this run, {summary['images_per_s']} images/s), "
        f"{summary['detections_this_run']} detections, failed: {failed}; output {summary['output']}"
    )
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
