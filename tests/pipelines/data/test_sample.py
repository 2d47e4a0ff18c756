"""One image to a sample without Ray: the augmentation drawn per epoch, crowd boxes, labels that follow the boxes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.categories import CategoryMap
from pipelines.data.sample import make_sample

CATEGORIES = CategoryMap.from_categories([{"id": i, "name": f"c{i}"} for i in range(1, 9)], "raw")


@pytest.fixture
def cfg(make_config):
    """The data tests' augmentation sizes, which fit the 120x160 test image: a crop cuts boxes away."""
    return make_config(decoder="pillow")


def _png(h=120, w=160) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _row(boxes_xywh, iscrowd=None, image_id=7):
    k = len(boxes_xywh)
    return {
        "image_id": image_id,
        "file_name": f"{image_id}.png",
        "height": 120,
        "width": 160,
        "boxes": np.asarray(boxes_xywh, np.float32).reshape(-1).tolist(),
        "category_id": list(range(1, k + 1)),  # box i has category i + 1 and annotation id 100 + i
        "iscrowd": [0] * k if iscrowd is None else list(iscrowd),
        "ann_id": [100 + i for i in range(k)],
    }


def test_each_epoch_draws_its_own_augmentation(cfg):
    """The same image is augmented differently from one epoch to the next, and the same way when an epoch
    is drawn again (a resumed run), as the augmentation is seeded by (seed, epoch, image id)."""
    data, row = _png(), _row([[10, 10, 30, 20]])

    def affine(epoch, config=cfg):
        s = make_sample(data, row, categories=CATEGORIES, cfg=config, augment=True, keep_crowd=False, epoch=epoch)
        assert s["epoch"] == epoch
        return tuple(s["affine"].tolist())

    by_epoch = [affine(e) for e in range(6)]
    assert len(set(by_epoch)) > 1, "every epoch drew the same augmentation"
    assert affine(3) == by_epoch[3]
    other_seed = cfg.model_copy(update={"seed": cfg.seed + 1})
    assert [affine(e, other_seed) for e in range(6)] != by_epoch


def test_labels_follow_the_boxes_a_crop_keeps(cfg):
    """A crop that cuts boxes away drops their labels, crowd flags and annotation ids with them."""
    grid = [[x, y, 12, 12] for x in (2, 70, 140) for y in (2, 100)]  # six small boxes near the edges
    row = _row(grid)
    cfg = cfg.model_copy(update={"crop_prob": 1.0})
    dropped = False
    for epoch in range(20):
        s = make_sample(_png(), row, categories=CATEGORIES, cfg=cfg, augment=True, keep_crowd=False, epoch=epoch)
        k = len(s["boxes"])
        assert len(s["labels"]) == k and len(s["iscrowd"]) == k and len(s["ann_id"]) == k
        assert s["labels"].tolist() == [a - 99 for a in s["ann_id"].tolist()], "each box keeps its own label"
        dropped |= k < len(grid)
    assert dropped, "no crop cut a box away: the test sizes no longer exercise it"


def test_training_leaves_crowd_regions_out(cfg):
    """iscrowd [0, 1]: without keep_crowd (training) only the first box is a target; with it, both are."""
    data, row = _png(), _row([[10, 10, 30, 20], [50, 40, 30, 30]], iscrowd=[0, 1])
    train = make_sample(data, row, categories=CATEGORIES, cfg=cfg, augment=False, keep_crowd=False, epoch=0)
    assert train["ann_id"].tolist() == [100] and train["iscrowd"].tolist() == [0] and train["labels"].tolist() == [1]
    val = make_sample(data, row, categories=CATEGORIES, cfg=cfg, augment=False, keep_crowd=True, epoch=0)
    assert val["ann_id"].tolist() == [100, 101] and val["iscrowd"].tolist() == [0, 1] and len(val["boxes"]) == 2
