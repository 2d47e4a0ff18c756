"""train.loggers without Ray: the records the metrics pump drains, read back from TensorBoard's event files
and MLflow's store; a tracker that cannot work is one warning and the others go on."""

from __future__ import annotations

import json
import logging
import socket
import sys

import numpy as np
import pytest
from PIL import Image

from core.evaluation import AP_KEYS
from pipelines.job_config import ConfigError, load_job_config
from pipelines.raytrain.run_dir import RunDir
from pipelines.raytrain.tracking import MLFLOW_DB, TENSORBOARD_DIR, RunSummary, Trackers

pytest.importorskip("tensorboard")
mlflow_tracking = pytest.importorskip("mlflow.tracking")

LOSS_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "class_error", "grad_norm")


def _step(global_step: int) -> dict:
    terms = {k: 1.0 / global_step + i for i, k in enumerate(LOSS_TERMS)}
    return {
        "kind": "step",
        "time": 1.7e9 + global_step,
        "epoch": 0,
        "global_step": global_step,
        "step": global_step,
        **terms,
        "lr": 2e-4,
        "lr_main": 2e-4,
        "lr_backbone": 2e-5,
        "step_images": 4,
        "step_time_s": 0.5,
        "images_per_s": 8.0,
        "max_mem_mb": 512.0,
    }


RECORDS = [
    {"kind": "event", "time": 1.7e9, "event": "start", "epoch": 0, "global_step": 0},
    _step(1),
    {"kind": "progress", "time": 1.7e9, "epoch": 0, "global_step": 1, "loss": 9.0, "lr": 1.0},
    _step(2),
    {"kind": "eval", "time": 1.7e9 + 3, "epoch": 0, "global_step": 2, "num_eval_images": 5, "eval_time_s": 1.0}
    | {k: 0.1 * (i + 1) for i, k in enumerate(AP_KEYS)},
    {"kind": "epoch", "time": 1.7e9 + 4, "epoch": 0, "epochs_done": 1, "global_step": 2, "loss": 0.75}
    | {"images_per_s": 8.0, "lr": 2e-4, "max_mem_mb": 512.0, "epoch_time_s": 3.0, "checkpoint_score": -1e30},
]
STEP_TAGS = {f"train/{k}" for k in (*LOSS_TERMS, "lr", "lr_main", "lr_backbone", "step_time_s", "images_per_s")} | {
    "train/max_mem_mb"
}


def _run(tmp_path, *loggers: str, name: str = "run") -> tuple[RunDir, object]:
    job = load_job_config(preset="tiny", overrides=[f"train.name={name}", f"train.loggers={json.dumps(loggers)}"])
    return RunDir(str(tmp_path), name).mkdir(), job


def _image(tmp_path) -> object:
    path = tmp_path / "run" / "val_images" / "00_image1.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(path)
    return path


def _scalars(run_dir: RunDir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir.file(TENSORBOARD_DIR)), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} | {
        "images": acc.Tags()["images"]
    }


def test_every_number_reaches_tensorboard_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, job = _run(tmp_path, "tensorboard", "mlflow")
    (run_dir.path / "ap_table.md").write_text("| AP |\n")
    warnings: list[str] = []
    trackers = Trackers.open(run_dir, job, warnings.append)
    trackers.log(RECORDS[:3])  # two drains, as the pump would
    trackers.log(RECORDS[3:])
    best = str(run_dir.path / "checkpoint_epoch0000")
    ap = {k: 0.5 for k in AP_KEYS}
    trackers.finish(RunSummary(succeeded=True, final_ap=ap, best_checkpoint=best, images=[_image(tmp_path)]))
    assert warnings == []

    scalars = _scalars(run_dir)
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
    assert scalars["train/loss_giou"] == [(1, pytest.approx(4.0)), (2, pytest.approx(3.5))]
    assert {f"val/{k}" for k in (*AP_KEYS, "num_eval_images")} <= set(scalars)
    assert scalars["val/AP50"] == [(2, pytest.approx(0.2))]
    assert scalars["epoch/loss"] == [(2, pytest.approx(0.75))]
    assert "epoch/checkpoint_score" not in scalars and "epoch/AP" not in scalars
    assert scalars["images"] == ["val_images/00_image1"]

    client = mlflow_tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir.file(MLFLOW_DB)}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(job.train.lr)
    assert run.data.params["train.loggers"] == '["tensorboard", "mlflow"]'
    assert run.data.params["model.num_queries"] == str(job.model.num_queries)
    assert set(run.data.metrics) == set(scalars) - {"images"}  # the same names: "train/loss"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]
    assert run.data.tags["best_checkpoint"] == best
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ap_table.md", "val_images"} <= artifacts


def test_steps_trained_again_replace_the_first_attempt_in_tensorboard(tmp_path):
    """A worker restart replays steps in one session; a resume from an older checkpoint in the next."""
    run_dir, job = _run(tmp_path, "tensorboard")
    first = Trackers.open(run_dir, job, print)
    first.log([_step(1), _step(2), _step(3)])
    first.log([_step(2) | {"loss": 20.0}, _step(3) | {"loss": 30.0}])  # restarted from step 1's checkpoint
    first.finish(RunSummary(succeeded=False))
    run_dir.append_metrics([_step(1), _step(2), _step(3)])  # what the pump wrote beside it
    resumed = Trackers.open(run_dir, job, print)
    resumed.log([_step(3) | {"loss": 300.0}, _step(4)])  # the next session, from step 2's checkpoint
    resumed.finish(RunSummary(succeeded=True))
    assert _scalars(run_dir)["train/loss"] == [
        (1, pytest.approx(1.0)),
        (2, pytest.approx(20.0)),
        (3, pytest.approx(300.0)),
        (4, pytest.approx(0.25)),
    ]


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, job = _run(tmp_path, "mlflow")
    first = Trackers.open(run_dir, job, pytest.fail)
    first.log(RECORDS[:2])
    first.finish(RunSummary(succeeded=False))
    second = Trackers.open(run_dir, job, pytest.fail)
    second.log(RECORDS[3:4])
    second.finish(RunSummary(succeeded=True))
    client = mlflow_tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir.file(MLFLOW_DB)}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]


def test_runs_sharing_a_tracking_uri_are_runs_of_one_experiment(tmp_path, monkeypatch):
    # A sweep's trials: each its own run directory (named by trial id), one MLFLOW_TRACKING_URI.
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a store it was given: ./mlruns
    for trial in ("trial_a", "trial_b"):
        run_dir, job = _run(tmp_path / "trials", "mlflow", name=trial)
        trackers = Trackers.open(run_dir, job, pytest.fail)
        trackers.log(RECORDS)
        trackers.finish(RunSummary(succeeded=True))
        assert not run_dir.file(MLFLOW_DB).exists()
    client = mlflow_tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["trial_a", "trial_b"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_down_is_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a retry (urllib3 logs each), at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    run_dir, job = _run(tmp_path, "mlflow", "tensorboard")
    warnings: list[str] = []
    trackers = Trackers.open(run_dir, job, warnings.append)
    trackers.log(RECORDS)
    trackers.finish(RunSummary(succeeded=True))
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracking off: "), warnings
    assert "\n" not in warnings[0]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # urllib3's retry lines
    assert [s for s, _ in _scalars(run_dir)["train/loss"]] == [1, 2]  # tensorboard went on


def test_a_store_that_breaks_mid_run_is_one_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, job = _run(tmp_path, "mlflow", "tensorboard")
    warnings: list[str] = []
    trackers = Trackers.open(run_dir, job, warnings.append)
    trackers.log(RECORDS[:2])
    run_dir.file(MLFLOW_DB).write_bytes(b"not a database" * 100)
    for record in RECORDS[2:]:
        trackers.log([record])
    trackers.finish(RunSummary(succeeded=True))
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracking off: "), warnings
    assert "\n" not in warnings[0] and len(warnings[0]) < 300, warnings[0]
    assert [s for s, _ in _scalars(run_dir)["train/loss"]] == [1, 2]


def test_a_missing_package_is_one_warning_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run_dir, job = _run(tmp_path, "tensorboard")
    warnings: list[str] = []
    Trackers.open(run_dir, job, warnings.append).log(RECORDS)
    assert len(warnings) == 1 and "tensorboard tracking off" in warnings[0] and "[tracking]" in warnings[0]


def test_loggers_from_the_command_line():
    assert load_job_config(preset="tiny", overrides=["train.loggers=tensorboard"]).train.loggers == ["tensorboard"]
    assert load_job_config(preset="tiny").train.loggers == []
    with pytest.raises(ConfigError, match="train.loggers"):
        load_job_config(preset="tiny", overrides=["train.loggers=wandb"])
