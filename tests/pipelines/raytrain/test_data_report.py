"""Skipped bad input reaches the run: printed on the driver and saved as data_report.json in the run directory."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.data.batching import iter_batches
from pipelines.data.report import data_report, format_data_report
from pipelines.job_config import load_job_config
from pipelines.raytrain.preflight import preflight
from pipelines.raytrain.run_datasets import prepare_data
from pipelines.raytrain.run_dir import DATA_REPORT_FILE, RunDir
from pipelines.raytrain.training import restore_data_report, write_data_report

pytestmark = pytest.mark.ray


def test_skipped_bad_input_is_reported_and_saved(ray_local, tmp_path, tiny_data, capsys):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_data["root"], root)
    js = json.loads((root / "instances_train.json").read_text())
    empty, truncated = js["images"][0]["file_name"], js["images"][1]["file_name"]
    (root / "train" / empty).write_bytes(b"")
    data = (root / "train" / truncated).read_bytes()
    (root / "train" / truncated).write_bytes(data[: len(data) // 2])
    # A third image keeps its pixels and size but gains an EXIF orientation tag: used as stored, flagged.
    from PIL import Image

    tagged = js["images"][2]["file_name"]
    with Image.open(root / "train" / tagged) as im:
        pixels = im.copy()
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels.save(root / "train" / tagged, "JPEG", quality=95, exif=exif.tobytes())
    bad_ann = next(a for a in js["annotations"] if a["image_id"] not in (js["images"][0]["id"], js["images"][1]["id"]))
    bad_ann["category_id"] = 99
    (root / "instances_train.json").write_text(json.dumps(js))

    job = preflight(
        load_job_config(
            preset="tiny",
            overrides=[
                f"data.root={root}",
                f"train.storage_path={tmp_path / 'runs'}",
                "train.name=skip",
                "demo_data=null",
                "data.on_bad_input=skip",
            ],
        )
    )
    data = prepare_data(job)
    run_dir = RunDir(job.train.storage_path, job.train.name).mkdir()
    print(format_data_report(write_data_report(data, run_dir), job.data.on_bad_input))  # as run_training does

    saved = json.loads(run_dir.file(DATA_REPORT_FILE).read_text())
    assert set(saved) == {"train", "val"}
    train = saved["train"]
    assert train["counts"] == {"empty_file": 1, "unknown_category": 1} and train["skipped"] == 2
    assert train["num_images"] == len(js["images"]) - 1
    assert empty in train["examples"]["empty_file"][0]
    assert f"annotation {bad_ann['id']} (category 99)" in train["examples"]["unknown_category"]
    assert saved["val"]["skipped"] == 0 and saved["val"]["counts"] == {}
    out = capsys.readouterr().out
    assert "data (data.on_bad_input=skip):" in out and "2 bad inputs skipped" in out
    assert f"empty_file: 1  e.g. {empty}" in out

    # The truncated JPEG is found only when decoded (here one pass on the driver; in a run, the epochs):
    # the report at the end of a run counts it too.
    seen = [t["image_id"] for b in iter_batches(data.datasets["train"], 4, device="cpu") for t in b["targets"]]
    assert js["images"][1]["id"] not in seen and len(seen) == len(js["images"]) - 2
    final = data_report(data.infos)["train"]
    assert final["counts"] == {"empty_file": 1, "unknown_category": 1, "undecodable_image": 1}
    assert truncated in final["examples"]["undecodable_image"][0]
    assert final["flagged"] == {"exif_orientation": 1} and tagged in final["examples"]["exif_orientation"][0]
    assert "exif_orientation: 1 (kept, pixels used as stored" in format_data_report({"train": final}, "skip")

    # A resume: the next session's ledgers start from the report, and meeting the same files again in its
    # epochs does not count them twice.
    write_data_report(data, run_dir)
    resumed = prepare_data(job, start_epoch=1)
    restore_data_report(resumed, run_dir)
    assert data_report(resumed.infos)["train"]["counts"] == final["counts"]
    list(iter_batches(resumed.datasets["train"], 4, device="cpu"))
    again = data_report(resumed.infos)["train"]
    assert (again["counts"], again["flagged"]) == (final["counts"], final["flagged"])
