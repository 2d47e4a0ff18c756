"""Evaluation on Ray Train workers: each infers on its val shard, rank 0 gathers and scores with pycocotools.

Also the evaluation-only worker loop (``eval_loop_per_worker``) that ``pipelines/evaluate.py`` runs.
Detections travel as one (R, 7) float64 array per worker: image_id, x, y, w, h, score, category_id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch.distributed as dist

from core.build import build_model
from core.checkpoint import load_model_weights
from core.evaluation import coco_evaluate, load_coco_gt
from pipelines.data.coco import load_json
from pipelines.engine import evaluate
from pipelines.job_config import JobConfig
from pipelines.raytrain.metrics import StepReporter
from pipelines.raytrain.worker_config import DatasetFacts, WorkerConfig
from pipelines.raytrain.worker_context import WorkerContext, distributed, shard_batches

log = logging.getLogger(__name__)


def load_val_ground_truth(job: JobConfig):
    """pycocotools ground truth of the val split (crowd boxes included: COCOeval ignores them properly)."""
    return load_coco_gt(load_json(job.data.ann_uri("val"), job.data.storage_options))


def _records_to_array(records: list[dict]) -> np.ndarray:
    # (R, 7): image_id, x, y, w, h, score, category_id; much smaller to gather than dicts.
    if not records:
        return np.zeros((0, 7), np.float64)
    return np.array([[r["image_id"], *r["bbox"], r["score"], r["category_id"]] for r in records], dtype=np.float64)


def _array_to_records(arr: np.ndarray) -> list[dict]:
    return [
        {"image_id": int(a[0]), "bbox": [float(v) for v in a[1:5]], "score": float(a[5]), "category_id": int(a[6])}
        for a in arr
    ]


def distributed_evaluate(
    model,
    postprocessor,
    batches,
    *,
    job: JobConfig,
    ctx: WorkerContext,
    coco_gt,
    dataset: DatasetFacts,
    on_batch: Callable[[int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
) -> tuple[dict[str, float] | None, list[dict]]:
    """Inference on this worker's val shard, detections gathered on rank 0 and scored by pycocotools.

    An image id seen on two workers is an error; fewer images than ``dataset.num_val`` is logged.
    ``on_batch`` gets this worker's images done after each batch (progress); ``warn`` takes the
    warnings meant for the person running the job.

    Returns:
        (stats, vis) on rank 0, (None, []) elsewhere: the AP dict (with "num_eval_images") and the
        images collected for drawing.
    """
    records, image_ids, vis = evaluate(
        model,
        postprocessor,
        batches,
        device=ctx.device,
        amp_dtype=ctx.amp_dtype,
        num_vis=job.train.num_vis_images if ctx.rank == 0 else 0,
        vis_score_threshold=job.train.vis_score_threshold,
        pixel_mean=job.data.pixel_mean,
        pixel_std=job.data.pixel_std,
        label_names=dataset.category_names,
        on_batch=on_batch,
    )
    payload = (_records_to_array(records), np.asarray(image_ids, np.int64))
    if distributed():
        gathered = [None] * dist.get_world_size() if ctx.rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
    else:
        gathered = [payload]
    if ctx.rank != 0:
        return None, []
    all_records = _array_to_records(np.concatenate([g[0] for g in gathered]))
    ids = np.concatenate([g[1] for g in gathered])
    all_ids, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        # Scoring an image twice would double its detections and bias AP: the val split must be a partition.
        raise RuntimeError(
            f"evaluation saw image ids more than once across workers: {all_ids[counts > 1][:10].tolist()}"
        )
    if dataset.num_val and len(all_ids) != dataset.num_val:
        warn(
            f"evaluated {len(all_ids)} of the {dataset.num_val} val images "
            "(images skipped at decode are counted in the data report)"
        )
    stats = coco_evaluate(coco_gt, all_records, all_ids.tolist())
    stats["num_eval_images"] = len(all_ids)
    return stats, vis


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Evaluation only (pipelines/evaluate.py): load the weights, infer on the val shard, report the AP.

    Args:
        config: ``WorkerConfig.to_loop_config()``; ``weights`` is the model under evaluation and the
            sink receives the AP and the drawn images (Result.metrics keeps only checkpointed reports).
    """
    cfg = WorkerConfig.from_loop_config(config)
    job, ctx = cfg.job, WorkerContext.current(cfg.job)
    model, _, postprocessor = build_model(
        job.detr_config(), load_backbone_weights=False, label_map=cfg.dataset.label_to_category_id
    )
    load_model_weights(model, ray.get(cfg.weights))
    # Inference needs no gradient sync: no DDP wrapper, just the device.
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)
    postprocessor.to(ctx.device)
    coco_gt = load_val_ground_truth(job) if ctx.rank == 0 else None
    reporter = StepReporter(cfg.sink if ctx.rank == 0 else None, job.train, ctx, 0)
    start = time.time()
    ap, vis = distributed_evaluate(
        model,
        postprocessor,
        shard_batches("val", job, ctx.device, -1),
        job=job,
        ctx=ctx,
        coco_gt=coco_gt,
        dataset=cfg.dataset,
        on_batch=lambda n: reporter.eval_progress(n, cfg.dataset.num_val),
        warn=reporter.warn,
    )
    if ctx.rank == 0:
        ap["eval_time_s"] = time.time() - start
        cfg.sink.log_vis.remote(vis)
        ray.get(cfg.sink.log.remote([{"kind": "eval", "time": time.time(), **ap}]))
    ray.train.report(ap if ctx.rank == 0 else {})
