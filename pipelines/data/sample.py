"""One image and its annotations to a training or validation sample: decode, check, augment, map labels.

Legend: K boxes of an image. Boxes arrive as COCO pixel xywh and leave as normalized cxcywh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipelines.data.batching import SAMPLE_SCHEMA, samples_to_table
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import BadInputError
from pipelines.data.data_config import DataConfig
from pipelines.data.decode import ImageDecodeError, decode_image, exif_orientation
from pipelines.data.transforms import (
    boxes_xywh_to_xyxy,
    boxes_xyxy_to_cxcywh_normalized,
    train_transform,
    val_transform,
)


def make_sample(
    image_bytes: bytes | memoryview,
    row: Mapping[str, Any],
    *,
    categories: CategoryMap,
    cfg: DataConfig,
    augment: bool,
    keep_crowd: bool,
    epoch: int,
) -> dict[str, Any]:
    """Decode and transform one image with its annotations; usable without Ray.

    Args:
        image_bytes: the encoded file.
        row: a META_SCHEMA row as a dict (image_id, file_name, height, width, boxes flat xywh,
            category_id, iscrowd, ann_id).
        augment: the paper's training augmentation, drawn from (cfg.seed, epoch, image_id);
            otherwise the validation resize.
        keep_crowd: keep iscrowd boxes (flagged) in the targets; training leaves them out.

    Returns:
        image (h, w, 3) uint8, boxes (K, 4) float32 normalized cxcywh, labels (K,) int64,
        iscrowd (K,) int8, ann_id (K,) int64, image_id, file_name, orig_size (H, W), affine (4,),
        epoch (-1 without augmentation).

    Raises:
        ImageDecodeError: the bytes don't decode.
        BadInputError: the decoded size differs from the annotation's height/width.
    """
    name = row["file_name"]
    image = decode_image(image_bytes, name=name, decoder=cfg.decoder)
    h, w = image.shape[:2]
    if (h, w) != (row["height"], row["width"]):
        orientation = exif_orientation(image_bytes)
        exif = (
            f"its EXIF orientation tag is {orientation} (shown rotated or flipped by viewers; the annotation "
            "must describe the stored pixels, which are used as they are)"
            if orientation != 1
            else "it has no EXIF orientation tag"
        )
        raise BadInputError(
            f"{name} (image {row['image_id']}): decoded size {h}x{w} differs from the "
            f"annotation's {row['height']}x{row['width']}; {exif}"
        )
    boxes = boxes_xywh_to_xyxy(np.asarray(row["boxes"], np.float32))
    cat = np.asarray(row["category_id"], np.int64)
    crowd = np.asarray(row["iscrowd"], np.int8)
    ann_id = np.asarray(row["ann_id"], np.int64)
    if not keep_crowd:
        sel = crowd == 0
        boxes, cat, crowd, ann_id = boxes[sel], cat[sel], crowd[sel], ann_id[sel]
    if augment:
        rng = np.random.default_rng([cfg.seed, epoch, int(row["image_id"])])
        out = train_transform(
            image,
            boxes,
            rng,
            short_sides=cfg.train_short_sides,
            max_size=cfg.max_size,
            crop_resize_sides=cfg.crop_resize_sides,
            crop_size=cfg.crop_size,
            hflip_prob=cfg.hflip_prob,
            crop_prob=cfg.crop_prob,
        )
    else:
        out = val_transform(image, boxes, short_side=cfg.val_short_side, max_size=cfg.max_size)
    oh, ow = out.image.shape[:2]
    return {
        "image": out.image,
        "image_id": int(row["image_id"]),
        "file_name": name,
        "orig_size": (h, w),
        "boxes": boxes_xyxy_to_cxcywh_normalized(out.boxes_xyxy, oh, ow),
        "labels": categories.labels(cat[out.keep]),
        "iscrowd": crowd[out.keep],
        "ann_id": ann_id[out.keep],
        "affine": out.affine.as_array(),
        "epoch": epoch if augment else -1,
    }


class DecodeSamples:
    """ROW_SCHEMA table -> SAMPLE_SCHEMA table; bad images raise or go to the ledger, as do EXIF-tagged ones."""

    def __init__(self, cfg: DataConfig, categories: CategoryMap, augment: bool, keep_crowd: bool, ledger: Any):
        self.cfg, self.categories, self.augment, self.keep_crowd, self.ledger = (
            cfg,
            categories,
            augment,
            keep_crowd,
            ledger,
        )

    def __call__(self, rows: pa.Table, epoch: int) -> pa.Table:
        torch.set_num_threads(1)  # one Ray CPU per task: no intra-op threads fighting the other tasks
        images = rows.column("image").to_pylist()
        meta = rows.drop_columns(["image"]).to_pylist()
        samples, bad, flagged = [], [], []
        for data, row in zip(images, meta):
            orientation = exif_orientation(data)
            if orientation != 1:
                flagged.append(("exif_orientation", f"{row['file_name']} (image {row['image_id']}, tag {orientation})"))
            try:
                samples.append(
                    make_sample(
                        data,
                        row,
                        categories=self.categories,
                        cfg=self.cfg,
                        augment=self.augment,
                        keep_crowd=self.keep_crowd,
                        epoch=epoch,
                    )
                )
            except ImageDecodeError as e:
                if self.cfg.on_bad_input == "error":
                    raise BadInputError(
                        f"undecodable image {e} (image {row['image_id']}); set "
                        "data.on_bad_input=skip to skip and count such files"
                    ) from e
                bad.append(("undecodable_image", f"{row['file_name']} (image {row['image_id']})"))
            except BadInputError as e:
                if self.cfg.on_bad_input == "error":
                    raise
                bad.append(("size_mismatch", f"{row['file_name']} (image {row['image_id']}): {e}"))
        if (bad or flagged) and self.ledger is not None:
            ray.get(self.ledger.record.remote(bad, flagged))  # recorded before these rows can be consumed
        return samples_to_table(samples) if samples else SAMPLE_SCHEMA.empty_table()
