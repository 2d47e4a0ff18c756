"""Run config: presets validate, overrides parse, files load, and errors name the field."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.job_config import PRESETS, ConfigError, JobConfig, load_job_config, parse_override, resume_job_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    job = load_job_config(preset=preset)
    assert isinstance(job, JobConfig)
    assert job.preset == preset


def test_paper_presets_follow_the_authors_recipe():
    for name, variant in [
        ("r50", "plain"),
        ("r50_box_refine", "with_box_refine"),
        ("r50_two_stage", "with_box_refine_two_stage"),
    ]:
        job = load_job_config(preset=name)
        assert job.detr_config().variant() == variant
        assert job.model.backbone == "resnet50"
        assert (job.train.epochs, job.train.lr_drop, job.total_batch_size) == (50, 40, 32)
        assert (job.train.lr, job.train.lr_backbone, job.train.weight_decay) == (2e-4, 2e-5, 1e-4)
        assert job.train.lr_linear_proj_mult == 0.1 and job.train.clip_max_norm == 0.1


def test_default_preset_is_the_demo():
    assert load_job_config().preset == "demo"


def test_overrides_parse_json_values_and_strings():
    job = load_job_config(
        overrides=[
            "train.lr=1e-4",
            "train.use_gpu=true",
            "data.train_short_sides=[96, 128]",
            "train.name=my-run",
            "train.finetune_from=null",
        ]
    )
    assert job.train.lr == 1e-4
    assert job.train.use_gpu is True
    assert job.data.train_short_sides == (96, 128)
    assert job.train.name == "my-run"
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_errors_name_every_bad_field():
    with pytest.raises(ConfigError) as e:
        load_job_config(
            overrides=["train.lr=-1", "train.epochs=0", "train.no_such_field=3", "train.lr_schedule=linear"]
        )
    msg = str(e.value)
    assert "train.lr: Input should be greater than 0" in msg
    assert "train.epochs: Input should be greater than or equal to 1" in msg
    assert "train.no_such_field: no such field; train has amp, " in msg
    assert "train.lr_schedule" in msg
    assert len(msg.splitlines()) == 5  # a heading, then one line per field


def test_each_bad_field_is_one_line_that_says_what_it_got():
    """A misspelled field names the closest one; a field of two forms (a worker count or a [min, max]
    range) is one line; a validator's own message is not repeated, nor the value it names."""

    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_job_config(overrides=list(overrides))
        heading, *lines = str(e.value).splitlines()
        assert heading == "invalid config:" and len(lines) == 1, str(e.value)
        return lines[0]

    assert error("trian.lr=1").startswith("trian: no such field (did you mean train?); the config has data, ")
    assert error("model.num_querys=5").startswith("model.num_querys: no such field (did you mean num_queries?)")
    assert error("train.num_workers=[1, 2, 3]") == (
        "train.num_workers: Input should be a valid integer; or Tuple should have at most 2 items after "
        "validation, not 3 (got [1, 2, 3])"
    )
    assert error("data.batch_size_per_worker=-1") == (
        "data.batch_size_per_worker: batch_size_per_worker must be >= 1, got -1"
    )
    assert error("train.epochs=1.5").endswith("fractional part (got 1.5)")


def test_model_and_data_errors_come_from_their_sections():
    with pytest.raises(ConfigError, match=r"model.*hidden_dim must be divisible by nheads"):
        load_job_config(overrides=["model.hidden_dim=96", "model.nheads=5"])
    with pytest.raises(ConfigError, match=r"data.hflip_prob"):
        load_job_config(overrides=["data.hflip_prob=2"])


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_job_config(overrides=["train.lr"])
    with pytest.raises(ConfigError, match="unknown preset 'r101'"):
        load_job_config(preset="r101")
    with pytest.raises(ConfigError, match=r"--set 'preset=r50': a preset is chosen by name \(--preset"):
        load_job_config(overrides=["preset=r50"])  # it would only have relabelled the demo config
    with pytest.raises(ConfigError, match=r"unknown preset \['r50'\]"):
        load_job_config(preset=["r50"])  # a file's "preset": ["r50"]


def test_an_object_set_over_a_section_changes_only_its_fields():
    job = load_job_config(overrides=['model={"num_queries": 50}'])
    assert (job.model.num_queries, job.model.backbone, job.model.hidden_dim) == (50, "resnet18", 128)  # demo's
    resources = ['train.worker_resources={"spot": 0.01}', 'train.worker_resources={"gpu_a100": 0.01}']
    assert load_job_config(overrides=resources).train.worker_resources == {"gpu_a100": 0.01}  # a field: replaced


def test_numbers_given_to_text_fields_are_text_and_inf_is_no_lr():
    job = load_job_config(overrides=["train.name=20240612", "data.root=2024", "train.storage_path=7"])
    assert (job.train.name, job.data.root, job.train.storage_path) == ("20240612", "2024", "7")
    with pytest.raises(ConfigError, match="train.lr: Input should be a finite number"):
        load_job_config(overrides=["train.lr=Infinity"])


def test_json_and_toml_files(tmp_path):
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"preset": "tiny", "train": {"epochs": 3}, "model": {"num_queries": 7}}))
    job = load_job_config(j, ["train.epochs=4"])
    assert job.preset == "tiny" and job.train.epochs == 4 and job.model.num_queries == 7
    t = tmp_path / "run.toml"
    t.write_text('[train]\nlr = 1e-4\nlr_schedule = "cosine"\n')
    job = load_job_config(t, preset="r50")
    assert job.train.lr == 1e-4 and job.train.lr_schedule == "cosine" and job.model.backbone == "resnet50"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="does not parse"):
        load_job_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_job_config(tmp_path / "missing.json")


def test_saved_config_round_trips():
    job = load_job_config(preset="tiny", overrides=["train.name=x"])
    again = JobConfig.model_validate_json(job.model_dump_json())
    assert again == job


def test_cli_prints_the_resolved_config(capsys):
    from pipelines.train import main

    assert main(["--preset", "r50_two_stage", "--set", "train.epochs=12", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["two_stage"] and printed["train"]["epochs"] == 12 and printed["preset"] == "r50_two_stage"


def test_toml_files_read_without_tomllib(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: the TOML readers fall back to tomli, which pyproject declares for it."""
    import importlib.util
    import sys
    from pathlib import Path

    import tomllib

    repo = Path(__file__).resolve().parents[2]
    assert "\"tomli>=1.1; python_version < '3.11'\"" in (repo / "pyproject.toml").read_text()
    # As on 3.10: `import tomllib` fails, and tomli (the same parser, published) is installed.
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    fresh = {}
    for name in ("pipelines/job_config.py", "cluster/render.py"):
        spec = importlib.util.spec_from_file_location(f"py310_{Path(name).stem}", repo / name)
        fresh[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh[name])
    (tmp_path / "run.toml").write_text("[train]\nlr = 3e-4\n")
    assert fresh["pipelines/job_config.py"].read_config_file(tmp_path / "run.toml") == {"train": {"lr": 3e-4}}
    assert fresh["cluster/render.py"].tomllib is tomllib


def test_resume_names_the_run_however_its_folder_is_written(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "exp1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(load_job_config(preset="tiny").model_dump_json())
    monkeypatch.chdir(tmp_path)
    for written in ("runs/exp1", "runs/exp1/", str(run)):
        train = resume_job_config(written).train
        assert (train.name, os.path.abspath(train.storage_path)) == ("exp1", str(tmp_path / "runs")), written
    monkeypatch.chdir(run)
    for written in (".", "./"):  # from inside the run directory
        train = resume_job_config(written).train
        assert (train.name, train.storage_path) == ("exp1", str(tmp_path / "runs")), written


def test_resume_refuses_another_model_before_anything_is_written(tmp_path):
    run = tmp_path / "exp1"
    run.mkdir()
    saved = load_job_config(preset="tiny").model_dump_json()
    (run / "config.json").write_text(saved)
    assert resume_job_config(str(run), ["train.epochs=9", "model.dropout=0.0"]).train.epochs == 9
    with pytest.raises(ConfigError) as e:
        resume_job_config(str(run), ["model.hidden_dim=64", "model.num_classes=5"])
    assert str(e.value) == (
        f"--resume {run}: a resumed run keeps its model (start a new run with --set train.finetune_from=<its "
        "checkpoint> instead): model.hidden_dim: run 32, --set 64; model.num_classes: run 3, --set 5"
    )
    assert (run / "config.json").read_text() == saved
