"""Prepared Parquet shards, one shard written without Ray: each holds its own slice of the images."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.coco import parse_instances
from pipelines.data.data_config import DataConfig
from pipelines.data.parquet import _WriteShard


def test_shards_split_the_images_without_overlap(tmp_path):
    """3 images at 2 per shard: shard 0 holds the first two, shard 1 the third; no image is in both."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(f"bytes of {i}".encode())
    js = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10} for i in range(3)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2]} for i in range(3)],
    }
    meta = parse_instances(js).table
    cfg = DataConfig(images_per_shard=2, rows_per_task=1, read_threads=1)
    out = tmp_path / "parquet"
    written = _WriteShard(meta, str(images), str(out), cfg)(pa.table({"id": [0, 1]})).to_pylist()
    assert [(w["path"], w["num_rows"], w["row_groups"]) for w in written] == [
        ("part-00000.parquet", 2, [1, 1]),
        ("part-00001.parquet", 1, [1]),
    ]
    assert all(json.loads(w["bad_input"])["counts"] == {} for w in written)
    shards = [pq.read_table(out / w["path"]).to_pylist() for w in written]
    assert [[r["image_id"] for r in s] for s in shards] == [[0, 1], [2]]
    assert [r["image"] for s in shards for r in s] == [b"bytes of 0", b"bytes of 1", b"bytes of 2"]
