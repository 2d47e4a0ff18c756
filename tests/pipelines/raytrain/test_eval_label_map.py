"""pipelines/evaluate.py scores a checkpoint's labels as the categories it was trained on, whatever the val
file lists, and refuses what would score at random: another split's categories, new class heads."""

from __future__ import annotations

import pytest
from tiny import tiny_config

from core.checkpoint import Checkpoint
from pipelines.data.categories import CategoryMap
from pipelines.job_config import ConfigError, eval_job_config
from pipelines.raytrain.evaluation import check_categories, trained_label_map
from pipelines.raytrain.preflight import PreflightError
from pipelines.raytrain.run_datasets import dataset_facts

NAMES = {1: "rectangle", 3: "ellipse", 7: "triangle", 8: "diamond"}


def facts(ids: tuple[int, ...], mode: str = "contiguous"):
    return dataset_facts(CategoryMap(ids, tuple(NAMES[i] for i in ids), mode), 6, 0, 4)


def test_a_val_file_listing_fewer_categories_keeps_the_trained_label_map():
    trained = facts((1, 3, 7, 8))
    ckpt = Checkpoint(config=tiny_config(num_classes=6), model={}, meta={"dataset": trained.model_dump(mode="json")})
    val = facts((1, 7, 8))  # the val file lists only the categories its annotations use
    assert val.label_to_category_id == [1, 7, 8, -1, -1, -1]  # label 1 would be scored as a triangle
    assert trained_label_map(val, ckpt).label_to_category_id == [1, 3, 7, 8, -1, -1]
    raw = facts((1, 7, 8), mode="raw")  # raw ids need no map
    assert trained_label_map(raw, ckpt) == raw
    authors = Checkpoint(config=tiny_config(num_classes=6), model={}, meta={}, source_format="authors")
    assert trained_label_map(val, authors) == val


def test_a_val_split_of_other_categories_is_refused_and_missing_ones_named(capsys):
    ckpt = Checkpoint(config=tiny_config(num_classes=6), model={}, meta={"dataset": facts((1, 3, 7)).model_dump()})
    with pytest.raises(PreflightError, match=r"categories \[8\] are none of the checkpoint's \[1, 3, 7\]"):
        check_categories(facts((8,)), ckpt)
    check_categories(facts((1, 8)), ckpt)
    assert "not trained on 1 of the split's categories (8 diamond)" in capsys.readouterr().out
    check_categories(facts((8,)), Checkpoint(config=tiny_config(num_classes=6), model={}, meta={}))  # authors'


def test_evaluation_keeps_the_checkpoints_model():
    ckpt = Checkpoint(config=tiny_config(num_classes=6), model={}, meta={})
    assert eval_job_config(ckpt, overrides=["model.dropout=0.0"]).model.num_classes == 6
    with pytest.raises(ConfigError, match=r"evaluation scores the checkpoint's own model: model.num_classes: "):
        eval_job_config(ckpt, overrides=["model.num_classes=8"])  # new class heads would score at random


def test_bad_counts_and_outs_are_one_line_naming_the_flag(capsys, tmp_path):
    from pipelines.evaluate import main

    (tmp_path / "afile").write_text("")
    assert main(["--checkpoint", "c.pt", "--out", str(tmp_path / "afile" / "eval")]) == 2  # before any work
    assert capsys.readouterr().err.startswith(f"error: --out '{tmp_path / 'afile' / 'eval'}' cannot be created: ")

    assert main(["--checkpoint", "c.pt", "--num-workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --num-workers must be >= 1, got 0\n"
    assert main(["--checkpoint", "c.pt", "--batch-size", "0"]) == 2  # it was taken as "not given"
    assert capsys.readouterr().err == "error: --batch-size must be >= 1, got 0\n"
