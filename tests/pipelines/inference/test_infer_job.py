"""Batch inference end to end on local Ray: detections equal the Predictor's, bad files are rows, reruns are no-ops."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from core.predictor import Predictor
from pipelines.data.decode import EXIF_ORIENTATION, decode_image
from pipelines.inference.extras import coco_results
from pipelines.inference.job import InferenceConfig, run_inference
from pipelines.inference.outputs import COCO_FILE, DRAWN_DIR, JOB_FILE, MANIFEST_FILE, OutputError
from pipelines.inference.steps import RESULT_SCHEMA

pytestmark = pytest.mark.ray

THRESHOLD, TOP_K = 0.3, 12


def run(checkpoint, input, output, **overrides):
    options = dict(
        checkpoint=str(checkpoint),
        input=str(input),
        output=str(output),
        score_threshold=THRESHOLD,
        top_k=TOP_K,
        batch_size=3,
        decode_batch=4,
        images_per_part=5,
        progress_every_s=1.0,
    )
    return run_inference(InferenceConfig(**{**options, **overrides}))


def rows_of(output) -> dict[str, dict]:
    rows = {}
    for p in sorted(Path(output).glob("part-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            assert r["uri"] not in rows, f"{r['uri']} has two rows"
            rows[r["uri"]] = r
    return rows


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in Path(folder).rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def folder_run(ray_local, checkpoint, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "detections"
    summary = run(checkpoint.parent, image_dir, out, coco_json=True, draw=2)
    return out, summary


def test_detections_equal_the_predictor_image_by_image(folder_run, checkpoint, image_dir, bad_files, categories):
    out, summary = folder_run
    rows = rows_of(out)
    good = sorted(p for p in image_dir.iterdir() if p.name not in bad_files)
    assert set(rows) == {str(p) for p in image_dir.iterdir()}
    predictor = Predictor.from_checkpoint(checkpoint, score_threshold=THRESHOLD, top_k=TOP_K, device="cpu")
    total = 0
    for p in good:
        row, image = rows[str(p)], decode_image(p.read_bytes())
        expected = predictor(image)
        assert row["error"] is None and row["error_kind"] is None
        assert (row["height"], row["width"]) == image.shape[:2]
        assert row["labels"] == expected.labels.tolist() and row["names"] == expected.names
        assert set(row["names"]) <= set(categories.values())
        np.testing.assert_allclose(row["scores"], expected.scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), expected.boxes, rtol=1e-4, atol=1e-3)
        total += len(row["scores"])
    assert total > 0, "the threshold left no detection: the comparison would be empty"
    assert summary["detections_this_run"] == total and summary["images_done"] == summary["images_total"] == 14


def test_bad_files_are_error_rows(folder_run, image_dir, bad_files):
    out, summary = folder_run
    rows = rows_of(out)
    for name, kind in bad_files.items():
        row = rows[str(image_dir / name)]
        assert row["error_kind"] == kind, row["error"]
        assert name in row["error"] and "\n" not in row["error"]
        assert row["boxes"] == row["scores"] == row["labels"] == row["names"] == []
        assert row["width"] is None and row["height"] is None
    assert summary["failed_this_run"] == {k: 1 for k in bad_files.values()}
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["images"] == 14 and manifest["failed"] == summary["failed_this_run"]
    assert sorted(p["file"] for p in manifest["parts"]) == sorted(p.name for p in out.glob("part-*.parquet"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_coco_json_scores_with_pycocotools(folder_run, coco, checkpoint, image_dir):
    out, _ = folder_run
    gt = COCO(os.path.join(coco["root"], coco["val_ann"]))
    results = json.loads((out / COCO_FILE).read_text())
    assert results and {r["image_id"] for r in results} <= set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    # The same detections made here from the predictor, in COCO's xywh, must score the same.
    predictor = Predictor.from_checkpoint(checkpoint, score_threshold=THRESHOLD, top_k=TOP_K, device="cpu")
    expected = []
    for img in gt.loadImgs(gt.getImgIds()):
        det = predictor(decode_image((image_dir / img["file_name"]).read_bytes()))
        for (x0, y0, x1, y1), s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            expected.append({"image_id": img["id"], "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    assert len(results) == len(expected)

    def ap(dets):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        return ev.stats

    np.testing.assert_allclose(ap(results), ap(expected), atol=1e-3)
    assert len(list((out / DRAWN_DIR).glob("*.png"))) == 2


def test_output_folder_reads_as_a_parquet_dataset(folder_run):
    """The README's line, pandas and Ray Data read the folder made with --coco-json and --draw."""
    import pandas as pd
    import ray

    out, _ = folder_run
    table = pq.read_table(str(out) + "/")
    assert table.num_rows == 14 and table.column_names == RESULT_SCHEMA.names
    assert len(pd.read_parquet(out)) == 14
    assert ray.data.read_parquet(str(out)).count() == 14


def test_coco_results_of_perfect_rows_score_ap_1(coco):
    """The writer's format, checked on the ground truth itself: rows holding the true boxes score AP 1."""
    gt = COCO(os.path.join(coco["root"], coco["val_ann"]))
    rows = []
    for img in gt.loadImgs(gt.getImgIds()):
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=img["id"])) if not a["iscrowd"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        labels = [a["category_id"] for a in anns]
        rows.append({"uri": f"/x/{img['file_name']}", "boxes": boxes, "scores": [0.9] * len(anns), "labels": labels})
        rows[-1]["error"] = None
    rows.append({"uri": "/x/bad.jpg", "boxes": [], "scores": [], "labels": [], "error": "bad"})
    results, unmatched = coco_results(rows)
    assert unmatched == []
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_rerun_over_finished_output_changes_nothing(folder_run, checkpoint, image_dir):
    out, _ = folder_run
    before = snapshot(out)
    summary = run(checkpoint.parent, image_dir, out, coco_json=True, draw=2)
    assert summary["images_this_run"] == 0 and summary["images_done"] == 14
    assert snapshot(out) == before


def test_an_output_inside_the_input_folder_is_not_read_as_input(ray_local, checkpoint, image_dir, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("000000000001.jpg", "000000000002.jpg"):
        shutil.copy(image_dir / name, d / name)
    first = run(checkpoint, d, d / "detections")
    assert first["images_total"] == 2 and first["failed_this_run"] == {}
    before = snapshot(d / "detections")
    again = run(checkpoint, d, d / "detections")  # its parts, _job.json and _manifest.json are no images
    assert again["images_total"] == 2 and again["images_this_run"] == 0
    assert snapshot(d / "detections") == before


def test_drawings_follow_the_threshold_and_skip_an_image_gone_since(ray_local, checkpoint, image_dir, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("000000000001.jpg", "000000000002.jpg"):
        shutil.copy(image_dir / name, d / name)
    out = tmp_path / "out"
    run(checkpoint, d, out, draw=2, draw_threshold=0.9)
    first = sorted(p.name for p in (out / DRAWN_DIR).glob("*.png"))
    assert len(first) == 2
    (d / "000000000002.jpg").unlink()
    run(checkpoint, d, out, draw=2, draw_threshold=0.2)  # the row of the gone image stays; it is not drawn
    assert "not drawn, " in capsys.readouterr().out
    again = sorted(p.name for p in (out / DRAWN_DIR).glob("*.png"))
    assert len(again) == 3 and set(first) < set(again)


def test_a_bad_coco_ann_is_refused_before_the_job(checkpoint, image_dir, tmp_path):
    for text, named in (("[]", "'images' list"), ('{"images": [{"id": 1}]}', "file_name and an integer id")):
        ann = tmp_path / "ann.json"
        ann.write_text(text)
        with pytest.raises(ValueError, match=f"--coco-ann .*ann.json: .*{named}"):
            run(checkpoint, image_dir, tmp_path / "out", coco_json=True, coco_ann=str(ann))
        assert not (tmp_path / "out").exists()


def test_rerun_with_other_settings_is_refused(folder_run, checkpoint, image_dir):
    out, _ = folder_run
    with pytest.raises(OutputError, match=r"score_threshold: output 0.3, now 0.5"):
        run(checkpoint.parent, image_dir, out, score_threshold=0.5)
    assert json.loads((out / JOB_FILE).read_text())["score_threshold"] == THRESHOLD


def test_manifest_input_new_images_and_unreadable_entries(ray_local, checkpoint, image_dir, tmp_path):
    """A .txt manifest: relative paths, a missing file, a folder, a repeated line; then more images added."""
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("000000000001.jpg", "000000000002.jpg", "000000000003.jpg"):
        shutil.copy(image_dir / name, d / name)
    (d / "a_folder.jpg").mkdir()
    manifest = tmp_path / "list.txt"
    manifest.write_text("# images\nimgs/000000000001.jpg\n\nimgs/000000000002.jpg\nimgs/missing.jpg\n")
    manifest.write_text(manifest.read_text() + f"{d}/a_folder.jpg\nimgs/000000000001.jpg\n")
    out = tmp_path / "out"
    first = run(checkpoint, manifest, out)
    rows = rows_of(out)
    assert first["images_total"] == 4 and len(rows) == 4
    assert rows[str(d / "missing.jpg")]["error_kind"] == "missing"
    assert rows[str(d / "a_folder.jpg")]["error_kind"] == "unreadable"
    # More lines later: only the new image is processed, and the old rows stay as they were.
    before = snapshot(out)
    manifest.write_text(manifest.read_text() + "imgs/000000000003.jpg\n")
    second = run(checkpoint, manifest, out)
    assert second["images_this_run"] == 1 and second["images_done"] == 5
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith("part-"))
    assert len(rows_of(out)) == 5


def test_photos_come_upright_and_dangling_links_are_rows(ray_local, checkpoint, image_dir, tmp_path):
    """An EXIF orientation 6 JPEG is read in the frame viewers show (raw with exif_transpose=False); a
    symlink whose target is gone is an `unreadable` row."""
    d = tmp_path / "photos"
    d.mkdir()
    stored = decode_image((image_dir / "000000000001.jpg").read_bytes())
    assert stored.shape[0] != stored.shape[1], "a square image cannot show a swapped frame"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(stored).save(d / "sideways.jpg", quality=95, exif=exif)
    stored = decode_image((d / "sideways.jpg").read_bytes())  # what the JPEG round trip left
    (d / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    predictor = Predictor.from_checkpoint(checkpoint, score_threshold=THRESHOLD, top_k=TOP_K, device="cpu")
    for transpose, pixels, tag in ((True, np.rot90(stored, -1), 6), (False, stored, 1)):
        out = tmp_path / f"out-{transpose}"
        run(checkpoint, d, out, exif_transpose=transpose)
        rows = rows_of(out)
        assert rows[str(d / "gone.jpg")]["error_kind"] == "unreadable", rows[str(d / "gone.jpg")]["error"]
        row, expected = rows[str(d / "sideways.jpg")], predictor(np.ascontiguousarray(pixels))
        assert row["error"] is None and row["exif_orientation"] == tag
        assert (row["height"], row["width"]) == pixels.shape[:2]
        assert len(row["scores"]) > 0 and row["labels"] == expected.labels.tolist()
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), expected.boxes, rtol=1e-4, atol=1e-3)
