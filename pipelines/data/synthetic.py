"""A COCO-format detection dataset of coloured shapes on textured backgrounds, deterministic by seed.

Classes are shapes (colour is random, so a detector has to learn shape). Category ids are deliberately
not contiguous so both label mappings get exercised. Writes `train/*.jpg`, `val/*.jpg`,
`instances_train.json` and `instances_val.json`; the returned dict is valid `DataConfig` kwargs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# (COCO id, name): ids with gaps, like COCO's 1..90 over 80 classes.
SHAPES: tuple[tuple[int, str], ...] = (
    (1, "rectangle"),
    (3, "ellipse"),
    (7, "triangle"),
    (8, "diamond"),
    (12, "cross"),
    (15, "ring"),
    (21, "pentagon"),
    (34, "star"),
)

SizeSpec = tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 background: smooth colour blobs, stripes and grain, muted so shapes stand out."""
    coarse = rng.random((h // 32 + 2, w // 32 + 2, 3)) * 255
    blobs = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period))[..., None]
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    img = base + 0.35 * (blobs - 128) + rng.uniform(5, 25) * stripes + rng.normal(0, 6, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(kind: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if kind in ("pentagon", "star"):
        n = 5 if kind == "pentagon" else 10
        t = -np.pi / 2 + np.arange(n) * 2 * np.pi / n
        r = np.ones(n) if kind == "pentagon" else np.where(np.arange(n) % 2 == 0, 1.0, 0.45)
        px, py = np.cos(t) * r, np.sin(t) * r
        # Stretch the points to fill the box exactly, so the box is the shape's extent.
        px = x0 + (px - px.min()) / (px.max() - px.min()) * (x1 - x0)
        py = y0 + (py - py.min()) / (py.max() - py.min()) * (y1 - y0)
        return list(zip(px.tolist(), py.tolist()))
    if kind in ("ellipse", "ring"):
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        return list(zip((cx + rx * np.cos(t)).tolist(), (cy + ry * np.sin(t)).tolist()))
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if kind == "rectangle":
        draw.rectangle(box, fill=colour)
    elif kind == "ellipse":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, min(x1 - x0, y1 - y0) // 5))
    elif kind == "cross":
        tw, th = max(1, (x1 - x0) // 6), max(1, (y1 - y0) // 6)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((x0, cy - th, x1, cy + th), fill=colour)
        draw.rectangle((cx - tw, y0, cx + tw, y1), fill=colour)
    else:
        draw.polygon(_polygon(kind, x0, y0, x1, y1), fill=colour)


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(area, 1)


def _vivid(rng: np.random.Generator) -> tuple[int, int, int]:
    c = rng.uniform(0, 255, 3)
    c[rng.integers(3)] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])  # push one channel to an end
    return tuple(int(v) for v in c)


def _make_image(
    rng: np.random.Generator,
    h: int,
    w: int,
    classes: tuple[tuple[int, str], ...],
    max_objects: int,
    empty_fraction: float,
    crowd_fraction: float,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    img = Image.fromarray(_texture(rng, h, w))
    draw = ImageDraw.Draw(img)
    objects: list[dict[str, Any]] = []
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        for _attempt in range(10):
            side = rng.uniform(0.12, 0.5) * min(h, w)
            aspect = float(np.exp(rng.uniform(-0.6, 0.6)))
            bw = max(8, int(side * np.sqrt(aspect)))
            bh = max(8, int(side / np.sqrt(aspect)))
            if bw >= w or bh >= h:
                continue
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = (x0, y0, x0 + bw - 1, y0 + bh - 1)
            # Overlap, but never so much that an earlier shape disappears behind a later one.
            if all(_iou(box, p) < 0.35 for p in placed):
                break
        else:
            continue
        cid, kind = classes[int(rng.integers(len(classes)))]
        _draw(draw, kind, box, _vivid(rng))
        placed.append(box)
        objects.append({"category_id": cid, "kind": kind, "box": box, "iscrowd": 0})
    if n and rng.random() < crowd_fraction:
        # A crowd region: a cluster of small same-class shapes under one box, as COCO marks crowds.
        cid, kind = classes[int(rng.integers(len(classes)))]
        cw, ch = int(w * 0.3), int(h * 0.3)
        cx0, cy0 = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        colour = _vivid(rng)
        for _ in range(6):
            s = int(rng.integers(6, max(7, min(cw, ch) // 3)))
            x, y = int(rng.integers(cx0, cx0 + cw - s)), int(rng.integers(cy0, cy0 + ch - s))
            _draw(draw, kind, (x, y, x + s - 1, y + s - 1), colour)
        objects.append(
            {"category_id": cid, "kind": "rectangle", "box": (cx0, cy0, cx0 + cw - 1, cy0 + ch - 1), "iscrowd": 1}
        )
    return np.asarray(img), objects


def _size(rng: np.random.Generator, image_size: SizeSpec) -> tuple[int, int]:
    hs, ws = image_size
    h = hs if isinstance(hs, int) else int(rng.integers(hs[0], hs[1] + 1))
    w = ws if isinstance(ws, int) else int(rng.integers(ws[0], ws[1] + 1))
    return h, w


def generate_coco(
    out_dir: str | os.PathLike,
    num_train: int = 64,
    num_val: int = 16,
    *,
    image_size: SizeSpec = ((160, 256), (160, 256)),
    num_classes: int = 4,
    max_objects: int = 6,
    empty_fraction: float = 0.08,
    crowd_fraction: float = 0.05,
    seed: int = 0,
    jpeg_quality: int = 90,
    threads: int | None = None,
) -> dict[str, str]:
    """Write a COCO-format dataset under `out_dir`.

    Args:
        image_size: (h, w) for every image, or ((h_min, h_max), (w_min, w_max)) drawn per image.
        num_classes: how many shape classes, 1..8; their ids are SHAPES' (1, 3, 7, 8, ...).
        max_objects: objects per image are 1..max_objects, except an `empty_fraction` with none.
        crowd_fraction: share of images that also get an `iscrowd=1` region.
        seed: same seed, same JSON and same pixels, whatever `threads` is.

    Returns:
        `DataConfig` fields: root, train_images, val_images, train_ann, val_ann.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    root = Path(out_dir)
    classes = SHAPES[:num_classes]
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in classes]
    next_ann = 1
    for split_code, (split, count, first_id) in enumerate((("train", num_train, 1), ("val", num_val, num_train + 1))):
        (root / split).mkdir(parents=True, exist_ok=True)

        def one(i: int, split_code=split_code, split=split, first_id=first_id) -> tuple[dict, list[dict]]:
            rng = np.random.default_rng([seed, split_code, i])
            h, w = _size(rng, image_size)
            pixels, objects = _make_image(rng, h, w, classes, max_objects, empty_fraction, crowd_fraction)
            image_id = first_id + i
            name = f"{image_id:012d}.jpg"
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=jpeg_quality)
            (root / split / name).write_bytes(buf.getvalue())
            return {"id": image_id, "file_name": name, "height": h, "width": w}, objects

        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(one, range(count)))
        images, annotations = [], []
        for image, objects in results:
            images.append(image)
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                bw, bh = x1 - x0 + 1, y1 - y0 + 1  # PIL fills x0..x1 inclusive
                poly = _polygon(o["kind"], x0, y0, x1 + 1, y1 + 1)
                annotations.append(
                    {
                        "id": next_ann,
                        "image_id": image["id"],
                        "category_id": o["category_id"],
                        "bbox": [float(x0), float(y0), float(bw), float(bh)],
                        "area": float(bw * bh),
                        "iscrowd": o["iscrowd"],
                        "segmentation": [[round(v, 2) for p in poly for v in p]],
                    }
                )
                next_ann += 1
        doc = {
            "info": {"description": f"synthetic shapes, seed {seed}", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / f"instances_{split}.json").write_text(json.dumps(doc))
    return {
        "root": str(root),
        "train_images": "train",
        "val_images": "val",
        "train_ann": "instances_train.json",
        "val_ann": "instances_val.json",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument(
        "--size",
        default="160-256x160-256",
        help="HxW, each a number or a min-max range, e.g. 480x640 or 128-256x128-256",
    )
    args = p.parse_args(argv)

    def side(s: str) -> int | tuple[int, int]:
        lo, _, hi = s.partition("-")
        return (int(lo), int(hi)) if hi else int(lo)

    hs, _, ws = args.size.partition("x")
    paths = generate_coco(
        args.out,
        args.num_train,
        args.num_val,
        image_size=(side(hs), side(ws)),
        num_classes=args.num_classes,
        max_objects=args.max_objects,
        seed=args.seed,
    )
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
