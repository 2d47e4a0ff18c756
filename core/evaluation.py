"""COCO box evaluation with pycocotools: detections in, the standard AP table out.

Detections are plain per-image dicts so that workers can gather them as lists before one process
scores them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The first six of COCOeval.stats, in its order.
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(image_id: int, result: Mapping[str, torch.Tensor | np.ndarray]) -> list[dict]:
    """One image's post-processed detections as COCO result records.

    Args:
        image_id: the COCO image id.
        result: "scores" (k,), "labels" (k,) COCO category ids, "boxes" (k, 4) xyxy in original pixels.
    """
    boxes = np.asarray(torch.as_tensor(result["boxes"]).detach().float().cpu(), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(torch.as_tensor(result["scores"]).detach().float().cpu(), dtype=np.float64).reshape(-1)
    labels = np.asarray(torch.as_tensor(result["labels"]).detach().cpu(), dtype=np.int64).reshape(-1)
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    return [
        {"image_id": int(image_id), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
        for b, s, c in zip(xywh, scores, labels)
    ]


def load_coco_gt(ann: str | Mapping) -> COCO:
    """A pycocotools COCO object from a JSON path or an already parsed dict, without its chatter."""
    coco = COCO()
    if isinstance(ann, Mapping):
        dataset = dict(ann)
    else:
        import json

        with open(ann) as f:
            dataset = json.load(f)
    dataset.setdefault("info", {})
    dataset.setdefault("licenses", [])
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(coco_gt: COCO, records: Iterable[dict], image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Score detection records against the ground truth.

    Args:
        coco_gt: ground truth (crowd boxes included: COCOeval ignores matches to them as it should).
        records: COCO result dicts (image_id, category_id, bbox xywh, score).
        image_ids: the images that were evaluated; defaults to every image of the ground truth.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions in [0, 1] (-1 where a size has no
        ground truth, as pycocotools reports it).
    """
    records = list(records)
    image_ids = sorted(set(coco_gt.getImgIds() if image_ids is None else image_ids))
    if not records:
        # loadRes refuses an empty list; no detections means zero AP, not an error.
        return {k: 0.0 for k in AP_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(records)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(AP_KEYS, evaluator.stats[:6])}


def format_ap_table(stats: Mapping[str, float]) -> str:
    """A small markdown table of the AP figures, in percent."""
    header = "| " + " | ".join(AP_KEYS) + " |"
    rule = "|" + "---|" * len(AP_KEYS)
    row = "| " + " | ".join(f"{100 * stats[k]:.1f}" if stats[k] >= 0 else "n/a" for k in AP_KEYS) + " |"
    return "\n".join([header, rule, row])
