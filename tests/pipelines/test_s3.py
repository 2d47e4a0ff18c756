"""Reading COCO from s3:// for real, against moto's S3 server started on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipelines.batching import DetectionCollate
from pipelines.data import build_dataset, build_raw_dataset, prepare_parquet

pytestmark = pytest.mark.ray

BUCKET = "coco-test"


@pytest.fixture(scope="module")
def s3_options(tmp_path_factory):
    """A moto S3 server subprocess on 127.0.0.1 and a free port; pyarrow S3FileSystem kwargs for it."""
    pytest.importorskip("moto.server", reason="moto[server] provides the local S3 endpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on port {port}; see {log.name}")
            time.sleep(0.2)
    yield {
        "endpoint_override": f"127.0.0.1:{port}",
        "scheme": "http",
        "access_key": "testing",
        "secret_key": "testing",
        "region": "us-east-1",
    }
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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

    pq = remote.model_copy(update={"parquet_dir": f"s3://{BUCKET}/parquet"})
    assert prepare_parquet(pq, "val") == f"s3://{BUCKET}/parquet/val_manifest.json"
    rows = sorted(build_raw_dataset(pq, "val")[0].take_all(), key=lambda r: r["image_id"])
    ref = sorted(build_raw_dataset(local, "val")[0].take_all(), key=lambda r: r["image_id"])
    assert [r["image"] for r in rows] == [r["image"] for r in ref]
    for r, q in zip(rows, ref):
        np.testing.assert_array_equal(r["boxes"], q["boxes"])
