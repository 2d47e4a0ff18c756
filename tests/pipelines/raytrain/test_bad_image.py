"""A corrupt JPEG in the default mode ends training and evaluation with one clear line and exit status 1."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory, tiny_data):
    """The tiny dataset with one train and one val JPEG cut in half (a real truncated file)."""
    root = tmp_path_factory.mktemp("corrupt") / "shapes"
    shutil.copytree(tiny_data["root"], root)
    broken = {}
    for split in ("train", "val"):
        image = json.loads((root / f"instances_{split}.json").read_text())["images"][0]
        path = root / split / image["file_name"]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        broken[split] = image
    return root, broken


def _last_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert lines, err
    return lines[-1]


def test_training_stops_with_the_files_line(ray_local, tmp_path, corrupt_data, capsys):
    from pipelines.train import main

    root, broken = corrupt_data
    args = ["--preset", "tiny", "--set", f"data.root={root}", "--set", "demo_data=null", "--set", "train.eval_every=0"]
    code = main([*args, "--set", f"train.storage_path={tmp_path}", "--set", "train.name=corrupt"])
    assert code == 1
    line = _last_error_line(capsys.readouterr().err)
    image = broken["train"]
    assert line.startswith("error: training failed: bad input: undecodable image"), line
    assert image["file_name"] in line and f"(image {image['id']})" in line and "data.on_bad_input=skip" in line
    assert "Traceback" not in line
    assert json.loads((tmp_path / "corrupt" / "status.json").read_text())["state"] == "failed"


def test_evaluation_stops_with_the_files_line(ray_local, tmp_path, corrupt_data, capsys):
    """The authors' checkpoint format, evaluated on the val split whose first JPEG is truncated."""
    from core.build import build_model
    from pipelines.evaluate import main
    from pipelines.job_config import load_job_config

    root, broken = corrupt_data
    job = load_job_config(preset="tiny", overrides=["model.num_classes=91"])
    model, _, _ = build_model(job.detr_config())
    hyper = argparse.Namespace(**job.model.model_dump(), **job.matcher.model_dump(), **job.loss.model_dump())
    torch.save({"model": model.state_dict(), "args": hyper}, tmp_path / "authors.pth")
    sets = ["data.val_ann=instances_val.json", "data.val_images=val", "data.val_short_side=96", "data.max_size=96"]
    code = main(
        ["--checkpoint", str(tmp_path / "authors.pth"), "--data", str(root), *(a for s in sets for a in ("--set", s))]
    )
    assert code == 1
    line = _last_error_line(capsys.readouterr().err)
    image = broken["val"]
    assert line.startswith("error: evaluation failed: bad input: undecodable image"), line
    assert image["file_name"] in line and f"(image {image['id']})" in line and "data.on_bad_input=skip" in line
