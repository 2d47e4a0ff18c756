"""The plain model exported to ONNX: equal to eager at other sizes and batches, behind Predictor.from_onnx,
and run by batch inference's actors (--engine onnxruntime) with the same rows as the PyTorch engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from exports import differences, export
from http_files import serve_folder

from core.export import ExportError
from core.predictor import Predictor
from pipelines.data.decode import decode_image
from pipelines.inference.job import InferenceConfig, load_onnx_for_inference, run_inference

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


def test_batch_inference_with_onnxruntime_gives_the_torch_detections(
    ray_local, onnx_file, checkpoint, image_dir, bad_files, tmp_path
):
    config = InferenceConfig(
        engine="onnxruntime",
        model=str(onnx_file),
        input=str(image_dir),
        output=str(tmp_path / "out"),
        score_threshold=THRESHOLD,
        top_k=TOP_K,
        batch_size=3,
        images_per_part=5,
    )
    summary = run_inference(config)
    assert summary["images_done"] == summary["images_total"] == 14
    rows = rows_of(tmp_path / "out")
    predictor = Predictor.from_checkpoint(checkpoint, score_threshold=THRESHOLD, top_k=TOP_K, device="cpu")
    for p in sorted(image_dir.iterdir()):
        row = rows[str(p)]
        if p.name in bad_files:
            assert row["error_kind"] == bad_files[p.name] and row["scores"] == []
            continue
        want = predictor(decode_image(p.read_bytes()))
        assert row["error"] is None and (row["labels"], row["names"]) == (want.labels.tolist(), want.names)
        np.testing.assert_allclose(row["scores"], want.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), want.boxes, rtol=0, atol=1e-3)


def test_a_static_export_is_refused_in_one_line(onnx_file, tmp_path):
    """A --static export takes one image size; a Predictor (and batch inference) sizes each image as it comes."""
    model = onnx.load(str(onnx_file))
    for axis, size in ((0, 1), (2, 96), (3, 128)):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = size
    static = tmp_path / "static.onnx"
    onnx.save(model, str(static))
    with pytest.raises(ExportError, match=r"static.onnx is a static export \(images of shape \(1, 3, 96, 128\)\)"):
        Predictor.from_onnx(static)


def test_the_model_can_be_an_http_url(onnx_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # downloads are cached there
    with serve_folder(onnx_file.parent) as base:
        data, _ = load_onnx_for_inference(f"{base}/{onnx_file.name}")
        with pytest.raises(ValueError, match=r"--model 'http://.*/missing.onnx' cannot be loaded: HTTP Error 404"):
            load_onnx_for_inference(f"{base}/missing.onnx")
    assert data == onnx_file.read_bytes()
    assert [p.read_bytes() for p in (tmp_path / "torch_home").rglob("*.onnx")] == [data]
