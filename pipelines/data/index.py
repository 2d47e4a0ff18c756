"""A split's index: its instances JSON parsed and checked against its image files, once, on the driver."""

from __future__ import annotations

from pipelines.data.coco import CocoIndex, load_coco
from pipelines.data.data_config import DataConfig, Split
from pipelines.storage import absolute


def load_index(cfg: DataConfig, split: Split) -> CocoIndex:
    """Parse and check the split's instances JSON and its image files (driver side, once)."""
    return load_coco(
        cfg.ann_uri(split),
        absolute(cfg.images_uri(split)),
        storage_options=cfg.storage_options,
        on_bad_input=cfg.on_bad_input,
        box_edge_tolerance=cfg.box_edge_tolerance,
    )
