"""Batch inference's steps one function at a time, without Ray: listing, whole writes, decoding, the
result rows, the job's settings and the input size the model gets."""

from __future__ import annotations

import io
import json
import resource
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from core.predictor import InputSize
from pipelines.inference import job
from pipelines.inference.job import InferenceConfig, job_input_size, run_inference
from pipelines.inference.outputs import OutputDir, OutputError
from pipelines.inference.sources import list_images
from pipelines.inference.steps import DecodeImages, PredictImages, results_table


def _png(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=exif.tobytes())
    return buf.getvalue()


def _decode(uris: list[str], input_size: InputSize | None = None) -> list[dict]:
    batch = pa.table({"uri": uris, "part": ["part-x.parquet"] * len(uris)})
    return DecodeImages(input_size or InputSize(), {}, read_threads=1)(batch).to_pylist()


# ---------------------------------------------------------------------- listing


def test_a_glob_with_a_folder_matches_the_path_below_the_input(tmp_path):
    """--glob 'a/*.jpg' picks the images of folder a/, not nothing."""
    (tmp_path / "a").mkdir()
    for rel in ("x.jpg", "a/y.jpg"):
        (tmp_path / rel).write_bytes(b"1")
    assert list_images(str(tmp_path), "a/*.jpg").uris == [str(tmp_path / "a" / "y.jpg")]


def test_hidden_folders_and_files_below_the_top_are_skipped(tmp_path):
    """A .cache folder or a .name file anywhere in the tree gets no row, not only at the top."""
    (tmp_path / "a" / ".cache").mkdir(parents=True)
    for rel in ("a/x.jpg", "a/.cache/w.jpg", "a/.y.jpg"):
        (tmp_path / rel).write_bytes(b"1")
    assert list_images(str(tmp_path)).uris == [str(tmp_path / "a" / "x.jpg")]


# ---------------------------------------------------------------------- writing


def test_a_small_json_file_is_rewritten_when_it_changes(tmp_path):
    """_manifest.json and friends follow the job: a changed content is written, an equal one left alone."""
    out = OutputDir(str(tmp_path))
    assert out.write_json("_x.json", {"a": 1}) is True
    assert out.write_json("_x.json", {"a": 2}) is True
    assert json.loads((tmp_path / "_x.json").read_text()) == {"a": 2}
    assert out.write_json("_x.json", {"a": 2}) is False


def test_a_write_that_fails_midway_leaves_the_earlier_file_whole(tmp_path):
    """The disk refuses the rest of a file (here: a file size limit) after part of it was written: the
    earlier file keeps its bytes, and no half file has its name or lies beside it."""
    out = OutputDir(str(tmp_path))
    out.write("_x.json", b"earlier\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 64 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: writes raise EFBIG
    try:
        with pytest.raises(OSError):
            out.write("_x.json", b"y" * (4 * limit))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "_x.json").read_bytes() == b"earlier\n"
    assert [p.name for p in tmp_path.iterdir()] == ["_x.json"]


# ---------------------------------------------------------------------- decoding


def test_a_photo_comes_upright_with_its_upright_size(tmp_path):
    """A 48-high, 64-wide image tagged EXIF orientation 6 (turn a quarter clockwise) reaches the model
    64 high and 48 wide, its pixels turned; its row's height and width are the upright frame's."""
    stored = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    (tmp_path / "p.png").write_bytes(_png(stored, orientation=6))
    (row,) = _decode([str(tmp_path / "p.png")], InputSize(short_side=48, max_size=4096))  # no resize
    assert row["error"] is None and row["exif_orientation"] == 6
    assert (row["height"], row["width"], row["resized_height"], row["resized_width"]) == (64, 48, 64, 48)
    upright = np.stack([stored[::-1, c] for c in range(64)])  # row c of the upright image: column c, bottom up
    assert np.array_equal(np.frombuffer(row["pixels"], np.uint8).reshape(64, 48, 3), upright)


def test_decode_failures_get_their_kind(tmp_path):
    """The summary tells a damaged image (starts like a PNG, then garbage) from a file that is no image."""
    png = _png(np.zeros((8, 8, 3), np.uint8))
    files = {
        "garbage.png": png[:8] + b"garbage",  # PNG signature, no header after it
        "half.png": png[: len(png) // 2],
        "hello.png": b"hello",
        "empty.png": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = _decode([str(tmp_path / n) for n in (*files, "missing.png")])
    kinds = {r["uri"].rsplit("/", 1)[1]: r["error_kind"] for r in rows}
    assert kinds == {
        "garbage.png": "corrupt",
        "half.png": "truncated",
        "hello.png": "unsupported",
        "empty.png": "empty",
        "missing.png": "missing",
    }
    assert all(r["pixels"] is None and r["error"].startswith(r["uri"]) for r in rows)


# ---------------------------------------------------------------------- the model step


def test_result_rows_keep_width_and_height_apart():
    """An image 4 wide and 3 high that failed has width 4 and height 3 in its row."""
    row = {"uri": "/i/a.jpg", "part": "p", "width": 4, "height": 3, "exif_orientation": None}
    t = results_table([{**row, "error": "/i/a.jpg: bad", "error_kind": "corrupt"}], {})
    assert t.column("width").to_pylist() == [4] and t.column("height").to_pylist() == [3]
    assert t.column("error_kind").to_pylist() == ["corrupt"] and t.column("boxes").to_pylist() == [[]]


class _RecordingPredictor:
    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, ...], int, int]] = []

    def predict_prepared(self, prepared):
        self.seen += [(p.pixels.shape, p.height, p.width) for p in prepared]
        none = SimpleNamespace(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0, int), names=[])
        return [none] * len(prepared)


def test_the_model_gets_each_image_height_by_width():
    """A decoded image 2 high and 3 wide reaches the predictor as (2, 3, 3) pixels, untouched."""
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    row = {"uri": "/i/a.jpg", "part": "p", "pixels": pixels.tobytes(), "resized_height": 2, "resized_width": 3}
    row.update(height=20, width=30, exif_orientation=1, error=None, error_kind=None)
    step = PredictImages.__new__(PredictImages)  # its constructor loads a model in a Ray actor
    step.predictor = predictor = _RecordingPredictor()
    t = step(pa.Table.from_pylist([row]))
    assert predictor.seen == [((2, 3, 3), 20, 30)]
    assert (t.column("width").to_pylist(), t.column("height").to_pylist(), t.column("error").to_pylist()) == (
        [30],
        [20],
        [None],
    )


# ---------------------------------------------------------------------- the job


def _config(tmp_path, **kw) -> InferenceConfig:
    return InferenceConfig(engine="onnxruntime", model="m.onnx", input=str(tmp_path), output=str(tmp_path / "o"), **kw)


def test_an_output_inside_the_input_drops_only_its_own_folder(tmp_path, monkeypatch, capsys):
    """--output in/out: the images of in/out are the job's own files, those of in/out2 are still inputs."""
    for rel in ("out/a.jpg", "out2/b.jpg", "c.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"1")
    todo: list[list[str]] = []
    monkeypatch.setattr(job, "load_onnx_for_inference", lambda uri: (b"onnx", InputSize()))
    monkeypatch.setattr(job, "connect_ray", lambda address=None: False)
    monkeypatch.setattr(job, "_run_pipeline", lambda cfg, model, size, images, uris, out, progress: todo.append(uris))
    cfg = InferenceConfig(engine="onnxruntime", model="m.onnx", input=str(tmp_path), output=str(tmp_path / "out"))
    summary = run_inference(cfg)
    assert todo == [[str(tmp_path / "c.jpg"), str(tmp_path / "out2" / "b.jpg")]]
    assert summary["images_total"] == 2
    assert "2 images in" in capsys.readouterr().out


def test_a_rerun_that_turns_photos_otherwise_is_refused(tmp_path):
    """Rows made with --exif-transpose and a rerun with --no-exif-transpose would mix two frames of
    boxes in one output: the rerun is refused by name."""
    upright, stored = _config(tmp_path), _config(tmp_path, exif_transpose=False)
    assert upright.settings()["exif_transpose"] is True and stored.settings()["exif_transpose"] is False
    out = OutputDir(str(tmp_path / "o"))
    out.prepare()
    out.check_job(upright.settings())
    row = {"uri": "/i/a.jpg", "part": "p", "width": 4, "height": 3, "exif_orientation": 1, "error": None}
    out.write_part(results_table([{**row, "error_kind": None}], {}))
    with pytest.raises(OutputError, match=r"exif_transpose: output True, now False"):
        out.check_job(stored.settings())


@pytest.mark.parametrize(
    ("image_size", "max_size", "expected"),
    [(600, None, (600, 1000)), (600, 900, (600, 900)), (None, 900, (800, 900)), (None, None, (800, 1333))],
)
def test_the_input_size_scales_the_long_side_cap_with_the_short_side(tmp_path, image_size, max_size, expected):
    """--image-size 600 on a checkpoint of 800/1333 resizes to 600 with a cap of 1000 (1333 * 600/800);
    an explicit --max-size wins."""
    cfg = _config(tmp_path, image_size=image_size, max_size=max_size)
    size = job_input_size(cfg, InputSize(800, 1333))
    assert (size.short_side, size.max_size) == expected


def test_coco_ann_without_coco_json_is_refused():
    """--coco-ann maps file names to ids for the COCO JSON; without --coco-json it would do nothing."""
    with pytest.raises(ValueError, match="coco_ann is only used with coco_json"):
        InferenceConfig(checkpoint="c.pt", input="in", output="out", coco_ann="a.json")
    assert InferenceConfig(checkpoint="c.pt", input="in", output="out", coco_ann="a.json", coco_json=True).coco_ann
