"""The plain model exported to ONNX: equal to eager at other sizes and batches, behind Predictor.from_onnx,
and run by batch inference's actors (--engine onnxruntime) with the same rows as the PyTorch engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from exports import differences, export

from core.predictor import Predictor
from pipelines.data.decode import decode_image
from pipelines.inference.job import InferenceConfig, run_inference

pytestmark = [pytest.mark.ray, pytest.mark.slow]

THRESHOLD, TOP_K = 0.3, 12


def rows_of(output) -> dict[str, dict]:
    return {r["uri"]: r for p in sorted(Path(output).glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()}


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    return export(checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx", "--format", "onnx")


def test_onnx_matches_eager_at_other_sizes_and_batches(onnx_file, checkpoint):
    for figures in differences(onnx_file, checkpoint):
        assert figures["logits"] <= 1e-4 and figures["boxes"] <= 1e-4, figures


def test_predictor_from_onnx_equals_from_checkpoint(onnx_file, checkpoint, image_dir, bad_files):
    torch_predictor = Predictor.from_checkpoint(checkpoint, score_threshold=THRESHOLD, top_k=TOP_K, device="cpu")
    onnx_predictor = Predictor.from_onnx(onnx_file, score_threshold=THRESHOLD, top_k=TOP_K, threads=1)
    assert onnx_predictor.input_size == torch_predictor.input_size
    images = [decode_image(p.read_bytes()) for p in sorted(image_dir.iterdir()) if p.name not in bad_files]
    total = 0
    for want, got in zip(torch_predictor(images), onnx_predictor(images)):
        assert got.labels.tolist() == want.labels.tolist() and got.names == want.names
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=0, atol=1e-3)
        total += len(want.scores)
    assert total > 0, "no detection above the threshold: the comparison would be empty"


def test_batch_inference_with_onnxruntime_gives_the_torch_rows(ray_local, onnx_file, checkpoint, image_dir, tmp_path):
    common = dict(input=str(image_dir), score_threshold=THRESHOLD, top_k=TOP_K, batch_size=3, images_per_part=5)
    run_inference(InferenceConfig(checkpoint=str(checkpoint), output=str(tmp_path / "torch"), **common))
    engine = dict(engine="onnxruntime", model=str(onnx_file))
    summary = run_inference(InferenceConfig(output=str(tmp_path / "onnx"), **engine, **common))
    assert summary["images_done"] == summary["images_total"] == 14
    torch_rows, onnx_rows = rows_of(tmp_path / "torch"), rows_of(tmp_path / "onnx")
    assert set(onnx_rows) == set(torch_rows)
    for uri, want in torch_rows.items():
        got = onnx_rows[uri]
        assert (got["error_kind"], got["labels"], got["names"]) == (want["error_kind"], want["labels"], want["names"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-5)
