"""Pre-flight: a bad config, missing data, an unreachable bucket or a wrong checkpoint fail before Ray starts;
on a cluster too small for the run, the driver says what is short or what waits, and nothing else of Ray's;
the driver's metrics pump writes a report's records before the report goes on."""

from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

from pipelines.job_config import load_job_config
from pipelines.raytrain.preflight import (
    PreflightError,
    check_resources,
    ensure_demo_data,
    load_finetune_weights,
    preflight,
    resolve,
    storage_root,
)


@pytest.fixture
def job_with(tmp_path, tiny_overrides):
    def make(*extra):
        return load_job_config(preset="tiny", overrides=tiny_overrides(tmp_path / "runs", "t", *extra))

    return make


def test_missing_annotations_name_the_field(tmp_path, job_with):
    job = job_with("data.val_ann=nope/instances_val.json")
    with pytest.raises(PreflightError, match=r"data.val_ann: file not found: .*nope/instances_val.json"):
        preflight(job)
    job = job_with(f"data.root={tmp_path / 'absent'}")
    with pytest.raises(PreflightError, match=r"data.train_ann: file not found"):
        preflight(job)
    # Read from Parquet shards, the run still scores against data.val_ann's ground truth.
    shards = tmp_path / "shards"
    shards.mkdir()
    for split in ("train", "val"):
        (shards / f"{split}_manifest.json").write_text("{}")
    job = job_with(f"data.parquet_dir={shards}", "data.val_ann=nope/instances_val.json")
    with pytest.raises(PreflightError, match=r"data.val_ann: file not found: .*nope/instances_val.json"):
        preflight(job)


def test_unreachable_bucket_fails_fast(tmp_path, job_with):
    # Nothing listens on port 9: the S3 client gets "connection refused" at once.
    job = job_with("train.storage_path=s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    t0 = time.time()
    with pytest.raises(PreflightError, match=r"train.storage_path='s3://bucket/runs.*' is unreachable"):
        preflight(job)
    assert time.time() - t0 < 30


def test_preflight_resolves_name_and_paths(tmp_path, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job_config(
        preset="tiny", overrides=[f"data.root={tiny_data['root']}", "demo_data=null", "train.storage_path=rel_runs"]
    )
    job = preflight(job)
    assert job.train.name.startswith("tiny-")
    assert job.train.storage_path == str(tmp_path / "rel_runs") and os.path.isdir(job.train.storage_path)


def test_demo_data_is_generated_once(tmp_path):
    job = load_job_config(preset="tiny", overrides=[f"data.root={tmp_path / 'gen'}"])
    assert ensure_demo_data(job)
    assert (tmp_path / "gen" / "instances_train.json").is_file()
    assert len(os.listdir(tmp_path / "gen" / "train")) == job.demo_data.num_train
    assert not ensure_demo_data(job)


def test_finetune_checkpoint_checks(tmp_path, job_with):
    missing = job_with(f"train.finetune_from={tmp_path / 'nope.pth'}")
    with pytest.raises(PreflightError, match="train.finetune_from"):
        load_finetune_weights(preflight(missing))

    # An authors'-format checkpoint of a model with another width: the architecture check names it.
    from core.build import build_model

    other = load_job_config(preset="tiny", overrides=["model.hidden_dim=64"])
    model, _, _ = build_model(other.detr_config())
    path = tmp_path / "authors.pth"
    args = argparse.Namespace(**other.model.model_dump(), **other.matcher.model_dump(), **other.loss.model_dump())
    torch.save({"model": model.state_dict(), "args": args, "epoch": 3}, path)
    job = preflight(job_with(f"train.finetune_from={path}"))
    with pytest.raises(PreflightError, match="hidden_dim"):
        load_finetune_weights(job)

    # The same architecture with another class count loads (class heads re-initialized).
    same = load_job_config(preset="tiny", overrides=["model.num_classes=91"])
    model, _, _ = build_model(same.detr_config())
    args = argparse.Namespace(**same.model.model_dump(), **same.matcher.model_dump(), **same.loss.model_dump())
    torch.save({"model": model.state_dict(), "args": args, "epoch": 3}, path)
    weights = load_finetune_weights(preflight(job_with(f"train.finetune_from={path}")))
    assert weights["class_embed.0.weight"].shape[0] == 91


def test_cli_bad_config_exits_before_ray(capsys):
    import ray

    from pipelines.train import main

    assert main(["--preset", "tiny", "--set", "train.lr=-1", "--set", "train.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: Input should be greater than 0" in err
    assert "train.num_workers: Input should be greater than or equal to 1" in err
    assert not ray.is_initialized()


def test_a_dashboard_address_is_one_line_before_anything_is_written(tmp_path, tiny_data, capsys, monkeypatch):
    """RAY_ADDRESS=http://...:8265, as exported for `ray job submit`, then a run started in the same shell."""
    import ray

    from pipelines.train import main

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    runs = tmp_path / "runs"
    assert (
        main(["--preset", "tiny", "--set", f"data.root={tiny_data['root']}", "--set", f"train.storage_path={runs}"])
        == 2
    )
    assert capsys.readouterr().err == (
        "error: Ray address http://127.0.0.1:8265 is a dashboard's, for `ray job submit`; a driver joins a "
        "cluster at host:6379 or auto (or unset RAY_ADDRESS to run on a local Ray)\n"
    )
    assert not ray.is_initialized() and not any(runs.iterdir())  # preflight made the folder, no run in it


def test_cli_missing_dataset_exits_before_ray(tmp_path, capsys):
    import ray

    from pipelines.train import main

    code = main(
        [
            "--preset",
            "r50",
            "--set",
            f"data.root={tmp_path / 'coco'}",
            "--set",
            f"train.storage_path={tmp_path / 'runs'}",
        ]
    )
    assert code == 2
    assert "data.train_ann: file not found" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_latest_checkpoint_is_the_registered_one(tmp_path, job_with):
    """A checkpoint folder Ray never registered (an interrupted upload) is not taken as the latest."""
    import json

    from pipelines.raytrain.preflight import SNAPSHOT_FILE, latest_checkpoint_epoch

    job = preflight(job_with())
    run = tmp_path / "runs" / "t"
    assert latest_checkpoint_epoch(job) is None
    (run / "checkpoint_epoch0000").mkdir(parents=True)
    (run / "checkpoint_epoch0001").mkdir()
    (run / "checkpoint_epoch0001" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_epoch0000", "metrics": {"epoch": 0}}}
    (run / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    assert latest_checkpoint_epoch(job) == 0


def test_backbone_weights_are_checked_on_the_driver(tmp_path, tiny_data, capsys):
    """Unreachable ImageNet weights fail before Ray starts, with a line naming the field and the way out."""
    import uuid

    import ray

    from pipelines.train import main

    name = f"resnet18-unreachable-{uuid.uuid4().hex[:8]}.pth"  # never in torch.hub's cache
    common = [
        "--preset",
        "tiny",
        "--set",
        f"data.root={tiny_data['root']}",
        "--set",
        "demo_data=null",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
    ]
    # Nothing listens on port 9: "connection refused" at once, as on a machine without network.
    assert main([*common, "--set", f"model.backbone_weights=http://127.0.0.1:9/{name}"]) == 2
    err = capsys.readouterr().err
    assert f"model.backbone_weights='http://127.0.0.1:9/{name}' cannot be downloaded" in err
    assert f"--set model.backbone_weights=/path/to/{name}" in err
    assert main([*common, "--set", f"model.backbone_weights={tmp_path / 'r18.pth'}"]) == 2
    err = capsys.readouterr().err
    assert f"model.backbone_weights='{tmp_path / 'r18.pth'}': file not found" in err
    assert not ray.is_initialized()


def test_generated_data_presets_leave_a_users_folder_alone(tmp_path, capsys):
    """The demo preset pointed at COCO-layout data: nothing generated there; the error names the right preset."""
    from pipelines.train import main

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    before = sorted(p.relative_to(coco) for p in coco.rglob("*"))
    code = main(["--preset", "demo", "--set", f"data.root={coco}", "--set", f"train.storage_path={tmp_path / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.train_ann: file not found" in err and "--preset cpu_coco" in err
    assert "generating" not in err and "remove" not in err
    assert sorted(p.relative_to(coco) for p in coco.rglob("*")) == before


@pytest.fixture(scope="module")
def two_cpus():
    """A local Ray of 2 CPUs with no autoscaler, as `ray start --head --num-cpus 2` gives."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_run_that_cannot_get_a_decode_cpu_stops_at_preflight(two_cpus, job_with):
    """On a 2-CPU cluster with no autoscaler, 2 workers x 1 CPU leave Ray Data's decode tasks nothing:
    the run would wait forever for its first batch, so it stops before any worker starts, naming the
    numbers and the setting."""
    from pipelines.raytrain.cluster import cluster_autoscales

    job = job_with("train.num_workers=2", "train.cpus_per_worker=1")
    # What run_training does once connected (a shortfall that would hang must raise, not wait).
    assert not cluster_autoscales()
    with pytest.raises(PreflightError) as err:
        check_resources(job, two_cpus.cluster_resources(), strict=not cluster_autoscales())
    assert "CPU: need 3 (2 workers x 1 + 1 for decoding), cluster has 2" in str(err.value)
    assert "train.num_workers" in str(err.value) and "\n" not in str(err.value)


def test_a_run_with_no_first_step_says_what_ray_has_pending(two_cpus):
    """Where a check cannot see the shortfall (a joined cluster), the driver says what waits once the first
    step is overdue: here the issue's case, a worker group's placement group holding both CPUs and a decode
    task waiting for one. Not before the timeout, and not once a step came."""
    import io

    from pipelines.raytrain.metrics import MetricsPump, MetricsSink

    ray = two_cpus
    group = ray.util.placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    decode = ray.remote(num_cpus=1)(lambda: None).remote()
    sink = MetricsSink.remote()
    stepped, waiting = io.StringIO(), io.StringIO()
    try:
        sink.log.remote([{"kind": "progress"}])  # a step came: nothing to say
        with MetricsPump(sink, None, out=stepped, first_step_timeout_s=1.0):
            time.sleep(2.5)
        with MetricsPump(sink, None, out=waiting, first_step_timeout_s=1.0) as pump:
            assert pump.pending_said is False  # not before the timeout
            deadline = time.monotonic() + 30
            while not pump.pending_said and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        ray.cancel(decode, force=True)
        ray.util.remove_placement_group(group)
        ray.kill(sink)
    assert stepped.getvalue() == ""
    line = waiting.getvalue()
    assert line.count("\n") == 1 and line.startswith("warning: no training step in "), line
    assert "tasks or actors waiting for {CPU: 1} x1" in line and "the cluster: CPU 2 of 2 in use" in line, line
    assert "train.num_workers" in line and "train.first_step_timeout_s" in line, line


def test_a_report_reaches_the_next_callback_once_its_records_are_written(two_cpus, tmp_path):
    """A sweep's scheduler may stop a trial as soon as it sees the trial's epoch report, ending the
    trial's process: the report waits in ``RecordsWritten`` until the driver's pump has written what the
    sink held when it came (here the pump drains once, 1.5 s late), so the epoch is in metrics.jsonl and
    the trackers. Records logged after the report (the workers go on) do not hold it back."""
    import threading

    from pipelines.raytrain.metrics import MetricsPump, MetricsSink, RecordsWritten
    from pipelines.raytrain.run_dir import METRICS_FILE, RunDir, read_metrics

    sink = MetricsSink.remote()
    run_dir = RunDir(str(tmp_path), "run").mkdir()
    pump = MetricsPump(sink, run_dir, out=None)
    two_cpus.get(sink.log.remote([{"kind": "epoch", "time": 0.0, "epoch": 0, "global_step": 2, "loss": 1.0}]))
    going_on = threading.Event()

    def next_epoch() -> None:
        while not going_on.wait(0.05):
            sink.log.remote([{"kind": "progress", "time": 0.0}])

    threads = [threading.Thread(target=next_epoch), threading.Timer(1.5, pump.drain)]
    callback = threading.Thread(
        target=RecordsWritten(sink, timeout_s=600).after_report, args=(None, [{}], None), daemon=True
    )
    for t in [*threads, callback]:
        t.start()
    try:
        callback.join(timeout=120)
        assert not callback.is_alive(), "the report waited for records logged after it"
        assert run_dir.file(METRICS_FILE).exists()
        assert [r["kind"] for r in read_metrics(run_dir.file(METRICS_FILE))] == ["epoch"]
    finally:
        going_on.set()
        for t in threads:
            t.join()
        two_cpus.kill(sink)


def test_a_submitted_job_keeps_its_runs_outside_rays_working_dir(tmp_path, tiny_data, monkeypatch):
    """Under `ray job submit` the current directory is Ray's unpacked copy of the working dir, removed
    with the session: a relative storage_path goes under the home folder instead; an absolute one stays."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what the job supervisor sets for its driver
    base = [f"data.root={tiny_data['root']}", "demo_data=null"]
    job = resolve(load_job_config(preset="tiny", overrides=[*base, "train.storage_path=runs"]))
    assert job.train.storage_path == str(tmp_path / "home" / "ray-deformable-detr" / "runs")
    assert storage_root("sweeps") == str(tmp_path / "home" / "ray-deformable-detr" / "sweeps")  # a sweep's
    job = resolve(load_job_config(preset="tiny", overrides=[*base, f"train.storage_path={tmp_path}/mine"]))
    assert job.train.storage_path == str(tmp_path / "mine")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    job = resolve(load_job_config(preset="tiny", overrides=[*base, "train.storage_path=runs"]))
    assert job.train.storage_path == str(tmp_path / "runs")


def test_rays_messages_to_the_driver_go_to_its_log_folder(two_cpus, tmp_path, monkeypatch, capfd):
    """The raylet's notices (e.g. "8 PYTHON worker processes have been started") reach a driver through
    Ray's error channel whatever log_to_driver says; they belong in Ray's log folder, not on our console."""
    import ray._private.worker as ray_worker
    from ray._private.utils import push_error_to_driver

    import pipelines.console as console

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored afterwards
    monkeypatch.setattr(console, "_diverted_to", None)
    kept = tmp_path / f"driver-console-{os.getpid()}.log"
    assert console.ray_lines_to_its_logs(str(tmp_path)) == str(kept)
    notice = "WARNING: 8 PYTHON worker processes have been started (test notice)"
    push_error_to_driver(ray_worker.global_worker, "worker_pool_large", notice)
    deadline = time.monotonic() + 30
    while not (kept.is_file() and notice in kept.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kept.is_file() and notice in kept.read_text()
    console_text = "".join(capfd.readouterr())
    assert "worker processes" not in console_text, console_text
