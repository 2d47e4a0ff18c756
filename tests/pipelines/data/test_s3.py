"""Reading COCO from s3:// for real, against moto's mock and a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipelines.data.batching import DetectionCollate
from pipelines.data.datasets import build_dataset, build_raw_dataset
from pipelines.data.parquet import prepare_parquet

pytestmark = pytest.mark.ray

BUCKET = "coco-test"


def _upload(local: Path, options: dict, prefix: str) -> None:
    fs = pafs.S3FileSystem(**options, allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{BUCKET}/{prefix}/{p.relative_to(local)}") as f:
                f.write(p.read_bytes())


def _val_samples(cfg):
    ds, info = build_dataset(cfg, "val")
    out = []
    for flat in ds.iter_torch_batches(batch_size=4, collate_fn=DetectionCollate()):
        pixels = flat["pixels"].split((flat["size"].prod(1) * 3).tolist())
        out += list(zip(flat["image_id"].tolist(), pixels, flat["boxes"].split(flat["num_boxes"].tolist())))
    return out, info


def test_read_folder_and_parquet_from_s3(ray_local, s3_options, coco_paths, make_config):
    _upload(Path(coco_paths["root"]), s3_options, "coco")
    local = make_config()
    remote = make_config(root=f"s3://{BUCKET}/coco", storage_options=s3_options)

    a, _ = _val_samples(local)
    b, info = _val_samples(remote)
    assert info.source == f"s3://{BUCKET}/coco/instances_val.json" and len(b) == info.num_images == 8
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, ia, ba), (_, ib, bb) in zip(a, b):
        assert (ia == ib).all() and (ba == bb).all()
    # The same bucket with its options in the URI: each image's path goes before the query.
    c, _ = _val_samples(make_config(root=f"s3://{BUCKET}/coco?" + urlencode(s3_options)))
    assert [x[0] for x in c] == [x[0] for x in a] and all((x[1] == y[1]).all() for x, y in zip(a, c))

    pq = remote.model_copy(update={"parquet_dir": f"s3://{BUCKET}/parquet"})
    assert prepare_parquet(pq, "val") == f"s3://{BUCKET}/parquet/val_manifest.json"
    rows = sorted(build_raw_dataset(pq, "val")[0].take_all(), key=lambda r: r["image_id"])
    ref = sorted(build_raw_dataset(local, "val")[0].take_all(), key=lambda r: r["image_id"])
    assert [r["image"] for r in rows] == [r["image"] for r in ref]
    for r, q in zip(rows, ref):
        np.testing.assert_array_equal(r["boxes"], q["boxes"])
