"""Batch inference from and to s3:// (input prefix, checkpoint and output), against a real S3 server (SeaweedFS).

A Ray job of its own: run on the real server only, not again on moto's mock.
"""

from __future__ import annotations

import io
from urllib.parse import urlencode

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from core.predictor import Predictor
from pipelines.data.decode import decode_image
from pipelines.inference.job import InferenceConfig, run_inference
from pipelines.inference.outputs import COCO_FILE, JOB_FILE, MANIFEST_FILE

pytestmark = pytest.mark.ray

BUCKET = "infer-test"


def test_s3_input_checkpoint_and_output(ray_local, seaweedfs_server, checkpoint, image_dir, bad_files):
    s3_options = seaweedfs_server.options
    fs = pafs.S3FileSystem(**s3_options, allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    for p in sorted(image_dir.iterdir()):
        with fs.open_output_stream(f"{BUCKET}/images/{p.name}") as f:
            f.write(p.read_bytes())
    with fs.open_output_stream(f"{BUCKET}/runs/x/checkpoint_epoch0001/checkpoint.pt") as f:
        f.write(checkpoint.read_bytes())
    query = "?" + urlencode(s3_options)
    args = dict(score_threshold=0.3, top_k=8, batch_size=2, decode_batch=4, images_per_part=4, coco_json=True)
    remote = InferenceConfig(
        checkpoint=f"s3://{BUCKET}/runs/x/checkpoint_epoch0001{query}",
        input=f"s3://{BUCKET}/images{query}",
        output=f"s3://{BUCKET}/detections{query}",
        **args,
    )
    summary = run_inference(remote)
    assert summary["images_done"] == summary["images_this_run"] == len(bad_files) + 10
    assert summary["failed_this_run"] == {k: 1 for k in bad_files.values()}

    names = sorted(fi.base_name for fi in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/detections")))
    parts = [n for n in names if n.startswith("part-")]
    assert {JOB_FILE, MANIFEST_FILE, COCO_FILE} <= set(names) and len(parts) == 4
    rows = {}
    for name in parts:
        with fs.open_input_stream(f"{BUCKET}/detections/{name}") as f:
            for r in pq.read_table(io.BytesIO(f.read())).to_pylist():
                rows[r["uri"]] = r
    assert sorted(rows) == sorted(f"s3://{BUCKET}/images/{p.name}" for p in image_dir.iterdir())  # no credentials
    assert all(rows[f"s3://{BUCKET}/images/{n}"]["error_kind"] == k for n, k in bad_files.items())

    # The detections are the predictor's on the same files.
    predictor = Predictor.from_checkpoint(checkpoint, score_threshold=0.3, top_k=8, device="cpu")
    for p in sorted(image_dir.iterdir()):
        if p.name not in bad_files:
            det, row = predictor(decode_image(p.read_bytes())), rows[f"s3://{BUCKET}/images/{p.name}"]
            assert row["labels"] == det.labels.tolist()
            np.testing.assert_allclose(row["scores"], det.scores, rtol=1e-4, atol=1e-5)

    # A rerun finds every image done and writes nothing.
    def listing():
        return sorted(
            (fi.path, fi.mtime_ns, fi.size) for fi in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/detections"))
        )

    before = listing()
    again = run_inference(remote)
    assert again["images_this_run"] == 0 and listing() == before
