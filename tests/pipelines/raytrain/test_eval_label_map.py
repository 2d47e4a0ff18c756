"""pipelines/evaluate.py scores a checkpoint's labels as the categories it was trained on, whatever the val
file lists."""

from __future__ import annotations

from tiny import tiny_config

from core.checkpoint import Checkpoint
from pipelines.data.categories import CategoryMap
from pipelines.raytrain.evaluation import trained_label_map
from pipelines.raytrain.run_datasets import dataset_facts

NAMES = {1: "rectangle", 3: "ellipse", 7: "triangle", 8: "diamond"}


def facts(ids: tuple[int, ...], mode: str = "contiguous"):
    return dataset_facts(CategoryMap(ids, tuple(NAMES[i] for i in ids), mode), 6, 0, 4)


def test_a_val_file_listing_fewer_categories_keeps_the_trained_label_map():
    trained = facts((1, 3, 7, 8))
    ckpt = Checkpoint(config=tiny_config(num_classes=6), model={}, meta={"dataset": trained.model_dump(mode="json")})
    val = facts((1, 7, 8))  # the val file lists only the categories its annotations use
    assert val.label_to_category_id == [1, 7, 8, -1, -1, -1]  # label 1 would be scored as a triangle
    assert trained_label_map(val, ckpt).label_to_category_id == [1, 3, 7, 8, -1, -1]
    raw = facts((1, 7, 8), mode="raw")  # raw ids need no map
    assert trained_label_map(raw, ckpt) == raw
    authors = Checkpoint(config=tiny_config(num_classes=6), model={}, meta={}, source_format="authors")
    assert trained_label_map(val, authors) == val
