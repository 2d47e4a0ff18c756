"""Outputs on request, made from the finished parts: COCO results JSON and images with their boxes drawn."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from pipelines.data.coco import load_json
from pipelines.data.decode import apply_exif_orientation, decode_image
from pipelines.inference.outputs import COCO_FILE, DRAWN_DIR, OutputDir
from pipelines.inference.sources import split_options
from pipelines.storage import read_bytes


def image_ids_from_annotations(ann_uri: str) -> dict[str, int]:
    """file_name -> image id of a COCO instances JSON (its ``images`` list).

    Raises:
        ValueError: the file is missing, not JSON, or has no ``images`` list of ``file_name``/``id`` entries.
    """
    base, options = split_options(ann_uri)
    doc = load_json(base, options)  # BadInputError (a ValueError) names a missing or malformed file
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"--coco-ann {base}: expected a COCO instances JSON with an 'images' list")
    try:
        return {str(im["file_name"]): int(im["id"]) for im in images}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--coco-ann {base}: every entry of 'images' needs a file_name and an integer id") from e


def _image_id(uri: str, by_name: dict[str, int] | None) -> int | None:
    """The COCO image id of an image: from the annotations' file names, else a numeric file stem (COCO's)."""
    if by_name:
        for key in (uri, uri.rsplit("/", 1)[-1]):
            if key in by_name:
                return by_name[key]
        # file_name may hold a sub-folder (e.g. "val2017/0001.jpg"): match the URI's tail.
        for name, image_id in by_name.items():
            if uri.endswith("/" + name):
                return image_id
        return None
    stem = os.path.splitext(uri.rsplit("/", 1)[-1])[0]
    return int(stem) if stem.isdigit() else None


def coco_results(rows: list[dict[str, Any]], by_name: dict[str, int] | None = None) -> tuple[list[dict], list[str]]:
    """COCO results of output rows: one entry per detection, bbox xywh in pixels.

    Returns:
        (results, URIs of images without an image id, left out).
    """
    results, unmatched = [], []
    for r in rows:
        if r["error"] is not None:
            continue
        image_id = _image_id(r["uri"], by_name)
        if image_id is None:
            unmatched.append(r["uri"])
            continue
        for (x0, y0, x1, y1), score, label in zip(r["boxes"], r["scores"], r["labels"]):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                    "score": round(float(score), 5),
                }
            )
    return results, unmatched


def write_coco_results(out: OutputDir, coco_ann: str | None, by_name: dict[str, int] | None) -> int:
    """Writes _detections_coco.json from every part; returns the number of detections in it.

    ``by_name``: ``image_ids_from_annotations(coco_ann)``, read before the job; None without ``coco_ann``.
    """
    results, unmatched = coco_results(out.read_results().to_pylist(), by_name)
    if unmatched:
        how = f"not in {coco_ann}" if coco_ann else "no numeric file name (give --coco-ann)"
        print(f"infer: {len(unmatched)} images left out of {COCO_FILE}, {how}; e.g. {unmatched[0]}")
    out.write(COCO_FILE, (json.dumps(results) + "\n").encode(), unless_equal=True)
    return len(results)


def draw_images(out: OutputDir, count: int, threshold: float, storage_options: dict[str, Any]) -> list[str]:
    """Draws the detections scoring at least ``threshold`` on the first ``count`` good images (by URI)."""
    from pipelines.raytrain.run_plots import draw_detections

    rows = [r for r in out.read_results().to_pylist() if r["error"] is None][:count]
    written = []
    with tempfile.TemporaryDirectory(prefix="ddetr-draw-") as tmp:
        for r in rows:
            stem = os.path.splitext(r["uri"].rsplit("/", 1)[-1])[0]
            # One drawing per image and threshold: a rerun at another threshold draws again.
            key = hashlib.sha1(f"{r['uri']}@{threshold:g}".encode()).hexdigest()[:8]
            rel = f"{DRAWN_DIR}/{stem}-{key}.png"
            if out.read(rel) is not None:
                continue  # drawn by an earlier run from the same rows
            try:
                image = decode_image(read_bytes(r["uri"], storage_options), name=r["uri"])
            except (OSError, ValueError) as e:  # moved or changed since its row was written
                print(f"infer: not drawn, {r['uri']} cannot be read again: {e}")
                continue
            keep = [i for i, s in enumerate(r["scores"]) if s >= threshold]
            item = {
                "image": apply_exif_orientation(image, r["exif_orientation"]),
                "true_boxes": np.zeros((0, 4), np.float32),
                "true_labels": np.zeros((0,), np.int64),
                "pred_boxes": np.asarray([r["boxes"][i] for i in keep], np.float32).reshape(-1, 4),
                "pred_scores": np.asarray([r["scores"][i] for i in keep], np.float32),
                "pred_labels": np.asarray([r["labels"][i] for i in keep], np.int64),
                "label_names": {int(r["labels"][i]): r["names"][i] for i in keep},
            }
            local = draw_detections(item, os.path.join(tmp, "drawn.png"))
            out.write(rel, local.read_bytes())
            written.append(rel)
    return written
