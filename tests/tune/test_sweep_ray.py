"""Sweeps of tiny trials on local Ray: a sweep in a bucket resumed after its driver was killed; results,
best config, ASHA stopping a sure loser and the trials in MLflow."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from s3_servers import CREDENTIALS

from core.checkpoint import read_checkpoint
from pipelines.raytrain.run_dir import read_metrics
from pipelines.raytrain.state import CHECKPOINT_FILE
from pipelines.raytrain.tracking import MLFLOW_DB
from pipelines.storage import fetch_file, join_uri, list_file_sizes, read_bytes
from pipelines.train import main as train_main
from tune.results import BEST_CONFIG_FILE, BEST_TRIAL_FILE, TABLE_CSV, TABLE_PARQUET
from tune.sweep_config import load_sweep_config
from tune.tuner import TRIALS_DIR, run_sweep

from .conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_killed_driver_resumes_without_rerunning_finished_trials(
    tmp_path, monkeypatch, sweep_overrides, seaweedfs_server
):
    """A sweep in a bucket of a real S3 server: its own process (and the local Ray it started) is killed
    once the first trial has finished and the second has a checkpoint; the same command then finishes the
    sweep from what the bucket holds. One training worker per trial: two-worker trials are the module
    sweep's, and each worker is a process to start.

    ASHA runs, its one rung at 2 epochs done: the resumed trial's report there is Tune's first iteration
    of the restored run, and ASHA reads it at its epochs done. (Tune restores ASHA with empty rungs: the
    reports from before the kill are compared with nothing after it, so that no trial is stopped here.)"""
    for name, value in CREDENTIALS.items():  # this process reads the bucket too
        monkeypatch.setenv(name, value)
    seaweedfs_server.create_bucket("sweeps")
    storage = f"s3://sweeps/{tmp_path.name}{seaweedfs_server.endpoint_query}"
    overrides = sweep_overrides(
        storage,
        "resume",
        'space={"train": {"lr": {"grid": [1e-3, 5e-4]}}}',
        "num_trials=1",
        "max_concurrent_trials=1",
        "scheduler.grace_period=2",
        epochs=2,
        num_workers=1,
    )
    cmd = [sys.executable, "tune/sweep.py", *(f"--set={o}" for o in overrides)]
    # The bucket's credentials (set above), and a home of its own: a bucket run stages its files under ~/.cache.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path / "home")}
    sweep = join_uri(storage, "resume")
    trials = join_uri(sweep, TRIALS_DIR)

    def trial_ids() -> list[str]:
        files = list_file_sizes(trials) or {}
        return sorted({rel.split("/")[0] for rel in files if "/" in rel})

    def checkpointed(trial_id: str) -> bool:
        files = list_file_sizes(join_uri(trials, trial_id)) or {}
        return any(rel.startswith("checkpoint_epoch0000/") for rel in files)

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            first_done = "finished" in (tmp_path / "first.log").read_text()
            ids = trial_ids() if first_done else []
            if len(ids) == 2 and checkpointed(ids[1]):
                break
            time.sleep(1)
        else:
            pytest.fail("the first run never reached one finished trial and one checkpointed: " + open(log.name).read())
        time.sleep(2)  # let Tune's experiment state take in the finished trial
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, and the local Ray it started with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    first, second = trial_ids()
    first_metrics = read_bytes(join_uri(trials, first, "metrics.jsonl"))
    # The driver is gone with its machine: the resumed sweep has only what the bucket holds.
    shutil.rmtree(tmp_path / "home")

    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep" in again.stdout
    # The finished trial did not run again; the interrupted one continued from its checkpoint.
    assert read_bytes(join_uri(trials, first, "metrics.jsonl")) == first_metrics
    records = read_metrics(fetch_file(join_uri(trials, second, "metrics.jsonl"), str(tmp_path)))
    events = [r for r in records if r["kind"] == "event"]
    assert [e["event"] for e in events] == ["start", "resume"] and events[1]["epoch"] >= 1
    # Epoch 0 ran once; epoch 1 may have run twice if the kill came between its end and its checkpoint.
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    assert epochs.count(0) == 1 and epochs[-1] == 1, epochs
    table = pq.read_table(io.BytesIO(read_bytes(join_uri(sweep, TABLE_PARQUET)))).to_pylist()
    assert sorted(r["train.lr"] for r in table) == [5e-4, 1e-3]
    assert all(r["status"] == "done" and r["epochs_run"] == 2 for r in table), table
    # What the scheduler read: the resumed trial's clock went on from the kill, Tune's restarted.
    reports = [json.loads(line) for line in read_bytes(join_uri(sweep, f"trial_{second}", "result.json")).splitlines()]
    assert [(r["epochs_done"], r["training_iteration"]) for r in reports][-1] == (2, 1), reports


@pytest.fixture(scope="module")
def asha_sweep(ray_local, tmp_path_factory, sweep_overrides):
    """One sweep that the three tests below read (each trial is a Ray Train run of its own: half a minute
    of start-up on a 2-core machine). Two trials in grid order, one at a time, each with a sampled lr and
    backbone multiplier: the second is scored on a val split without objects, which pycocotools scores
    -1, below the first trial's AP at the first rung, whatever it is: the trial that must lose. The
    trials log to MLflow, with no tracking URI set: the sweep directory's store."""
    storage = tmp_path_factory.mktemp("sweep")
    space = {
        "data": {"val_ann": {"grid": ["instances_val.json", "instances_val_empty.json"]}},
        "train": {"lr": {"loguniform": [1e-4, 2e-3]}, "lr_backbone_mult": {"choice": [0.1, 0.5]}},
    }
    overrides = sweep_overrides(
        storage,
        "asha",
        f"space={json.dumps(space)}",
        "num_trials=1",
        "scheduler.grace_period=1",
        "scheduler.reduction_factor=2",
        epochs=2,
        loggers=["mlflow"],
    )
    assert "MLFLOW_TRACKING_URI" not in os.environ
    cfg, job, space = load_sweep_config(overrides=overrides)
    return storage, run_sweep(cfg, job, space, progress_every_s=5)


def test_sweep_table_best_config_and_training_from_it(asha_sweep):
    tmp_path, outcome = asha_sweep
    sweep = tmp_path / "asha"

    assert len(outcome.rows) == 2
    for row in outcome.rows:
        assert row["AP"] is not None and -1.0 <= row["AP"] <= 1.0 and row["AP50"] is not None
        assert 1e-4 <= row["train.lr"] <= 2e-3 and row["train.lr_backbone_mult"] in (0.1, 0.5)
        assert row["checkpoint"] and os.path.isdir(row["checkpoint"])
    assert len({r["train.lr"] for r in outcome.rows}) == 2
    assert pq.read_table(sweep / TABLE_PARQUET).num_rows == 2
    assert (sweep / TABLE_CSV).read_text().count("\n") == 3
    for name in ("sweep_config.json", "base_config.json", "metric_vs_params.png", "metric_curves.png"):
        assert (sweep / name).stat().st_size > 0, name

    best = json.loads((sweep / BEST_TRIAL_FILE).read_text())
    assert best["trial_id"] == outcome.rows[0]["trial_id"]
    # The best checkpoint is one of ours, holding the trial's config.
    ckpt = read_checkpoint(os.path.join(best["checkpoint"], CHECKPOINT_FILE))
    trained = json.loads(ckpt.meta["job_config"])
    assert trained["train"]["lr"] == pytest.approx(best["params"]["train.lr"])

    config = json.loads((sweep / BEST_CONFIG_FILE).read_text())
    assert config["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert config["train"]["lr_backbone"] == pytest.approx(
        best["params"]["train.lr"] * best["params"]["train.lr_backbone_mult"]
    )
    # One worker: the best config is what is tested here; two-worker training is the trials' (and
    # tests/pipelines/raytrain's), and each worker is a process to start.
    where = [f"--set=train.storage_path={tmp_path}", "--set=train.name=again", "--set=train.num_workers=1"]
    code = train_main(["--config", str(sweep / BEST_CONFIG_FILE), *where])
    assert code == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["train"]["lr"] == config["train"]["lr"] and again["model"] == config["model"]
    assert [r["epoch"] for r in read_metrics(tmp_path / "again" / "metrics.jsonl") if r["kind"] == "eval"] == [0, 1]


def test_asha_stops_the_trial_that_must_lose(asha_sweep):
    _, outcome = asha_sweep
    rows = {r["data.val_ann"]: r for r in outcome.rows}
    winner, loser = rows["instances_val.json"], rows["instances_val_empty.json"]
    assert winner["status"] == "done" and winner["epochs_run"] == 2 and not winner["stopped_early"]
    assert loser["stopped_early"] and loser["epochs_run"] == 1 and loser["AP"] == -1.0
    curves = {s.params["data.val_ann"]: s.curve for s in outcome.summaries}
    assert [e for e, _ in curves["instances_val_empty.json"]] == [1]


def test_the_trials_are_runs_of_one_mlflow_experiment(asha_sweep):
    from mlflow.tracking import MlflowClient

    storage, outcome = asha_sweep
    sweep = storage / "asha"
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / MLFLOW_DB}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("asha").experiment_id])}
    rows = {r["trial_id"]: r for r in outcome.rows}
    assert sorted(runs) == sorted(rows)
    for trial_id, row in rows.items():
        run = runs[trial_id]
        assert run.data.tags["sweep"] == str(sweep)
        assert float(run.data.params["train.lr"]) == pytest.approx(row["train.lr"])
        aps = [m.value for m in client.get_metric_history(run.info.run_id, "val/AP")]
        assert len(aps) == row["epochs_run"] and max(aps) == pytest.approx(row["AP"]), (aps, row)
        # The trial ASHA stopped could not end its run: the sweep's driver did.
        assert run.info.status == ("KILLED" if row["stopped_early"] else "FINISHED"), row
        assert not (sweep / TRIALS_DIR / trial_id / MLFLOW_DB).exists()
