"""Run outputs: metrics history across restarts, curves and drawn validation images."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipelines.raytrain.run_dir import METRICS_FILE, RunDir, latest_history, read_metrics
from pipelines.raytrain.run_plots import draw_detections, plot_curves
from pipelines.storage import fetch_file, filesystem_for, join_uri, read_bytes, split_uri, write_bytes


def test_latest_history_keeps_the_replayed_attempt():
    records = [{"kind": "step", "global_step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    records += [{"kind": "event"}]
    records += [{"kind": "step", "global_step": s, "loss": 2.0} for s in (3, 4, 5)]  # restart from step 2
    out = latest_history(records, "step", "global_step")
    assert [r["global_step"] for r in out] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in out] == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_bucket_uris_keep_their_options_at_the_end():
    storage = "s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http"
    run = join_uri(storage, "demo")
    assert run == "s3://bucket/runs/demo?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (
        join_uri(run, "config.json") == "s3://bucket/runs/demo/config.json?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert split_uri(run) == ("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", "demo")
    assert RunDir(storage, "demo", staging_root="/tmp/x").uri == run
    fs, path = filesystem_for(join_uri(run, "config.json"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/runs/demo/config.json"
    assert join_uri("/data/runs/", "demo") == "/data/runs/demo" and split_uri("/data/runs/demo") == (
        "/data/runs",
        "demo",
    )


def test_metrics_jsonl_round_trip_and_torn_line(tmp_path):
    run = RunDir(str(tmp_path), "r").mkdir()
    run.append_metrics([{"kind": "step", "global_step": 1, "x": np.float32(0.5)}])
    with open(run.file("metrics.jsonl"), "a") as f:
        f.write('{"kind": "step", "glo')  # a driver killed mid-write
    assert read_metrics(run.file("metrics.jsonl")) == [{"kind": "step", "global_step": 1, "x": 0.5}]
    run.append_metrics([{"kind": "event", "event": "resume"}])  # the next session's first record is kept
    assert [r["kind"] for r in read_metrics(run.file("metrics.jsonl"))] == ["step", "event"]


def test_curves_and_drawn_images(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"kind": "step", "global_step": s, "loss": 10 / s, "loss_ce": 1 / s, "loss_bbox": 0.5, "loss_giou": 0.4}
        for s in range(1, 30)
    ]
    records += [{"kind": "eval", "epoch": e, "AP": 0.1 * e, "AP50": 0.2 * e, "AP75": 0.05 * e} for e in range(3)]
    written = plot_curves(records, tmp_path)
    assert sorted(p.name for p in written) == ["ap.png", "loss.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    item = {
        "image_id": 7,
        "image": np.full((60, 80, 3), 128, np.uint8),
        "true_boxes": np.array([[10, 10, 40, 30]]),
        "true_labels": np.array([3]),
        "pred_boxes": np.array([[12, 11, 41, 33]]),
        "pred_scores": np.array([0.9]),
        "pred_labels": np.array([3]),
        "label_names": {3: "ellipse"},
    }
    from PIL import Image

    path = draw_detections(item, tmp_path / "img.png", min_side=120)
    img = np.asarray(Image.open(path))
    assert img.shape[:2] == (120, 160)
    assert (img[..., 1] > 180).any() and (img[..., 0] > 200).any()  # green and red boxes drawn


def test_one_evaluation_and_no_prediction_are_said(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    one = [{"kind": "eval", "epoch": 0, "AP": 0.2, "AP50": 0.4, "AP75": 0.1, "APs": -1.0, "APm": 0.2, "APl": 0.3}]
    (ap,) = plot_curves(one, tmp_path)
    assert ap.name == "ap.png" and ap.stat().st_size > 1000
    item = {
        "image_id": 3,
        "image": np.full((60, 80, 3), 128, np.uint8),
        "true_boxes": np.array([[10, 10, 40, 30]]),
        "true_labels": np.array([1]),
        "pred_boxes": np.zeros((0, 4)),
        "pred_scores": np.zeros(0),
        "pred_labels": np.zeros(0, np.int64),
        "score_threshold": 0.3,
    }
    img = np.asarray(Image.open(draw_detections(item, tmp_path / "none.png", min_side=120)))
    banner = img[:16, :200]
    assert (banner == 255).all(axis=-1).any() and ((banner[..., 0] > 200) & (banner[..., 1] < 80)).any()


def _reporter(**train) -> tuple[object, list[dict]]:
    """Rank 0's StepReporter of a 50-step epoch, one metrics line a step, and the records it sends."""
    import torch

    from pipelines.job_config import TrainConfig
    from pipelines.raytrain.metrics import StepReporter
    from pipelines.raytrain.worker_context import WorkerContext

    sent: list[dict] = []

    class Sink:  # the metrics sink actor's one method, as the reporter calls it
        class log:
            remote = staticmethod(sent.extend)

    config = TrainConfig(metrics_every_steps=1, **train)
    ctx = WorkerContext(0, 1, torch.device("cpu"), None)
    return StepReporter(Sink(), config, ctx, steps_per_epoch=50), sent


def test_an_eta_past_a_day_counts_the_days():
    from pipelines.raytrain.metrics import format_duration

    assert [format_duration(s) for s in (59.6, 3723, 86399, 3 * 86400 + 3600)] == [
        "00:00:59",
        "01:02:03",
        "23:59:59",
        "3d 01:00:00",  # it read 01:00:00
    ]


def test_eta_waits_for_the_steady_rate():
    """Warm-up steps 30x slower than the rest give no ETA, and leave no trace in the one that follows."""
    from pipelines.raytrain.metrics import ETA_MIN_STEPS, ETA_WARMUP_STEPS

    reporter, sent = _reporter(epochs=2, log_every_s=1e-9)
    for step in range(1, ETA_WARMUP_STEPS + ETA_MIN_STEPS + 1):
        step_s = 30.0 if step <= ETA_WARMUP_STEPS else 1.0
        record = {"step": step, "step_time_s": step_s, "step_images": 2, "loss": 1.0, "lr": 1e-4}
        reporter.on_step(record, epoch=0, global_step=step)
    etas = [r["eta_s"] for r in sent if r["kind"] == "progress"]
    assert etas[:-1] == [None] * (len(etas) - 1)
    assert etas[-1] == pytest.approx(100 - (ETA_WARMUP_STEPS + ETA_MIN_STEPS))  # steps left x 1 s


def test_a_checkpoint_event_follows_every_step_it_holds():
    """Step records held back for the next flush go out before a checkpoint's event: a group stopped right
    after the checkpoint loses none of the steps a resumed run will not train again."""
    reporter, sent = _reporter(epochs=1, log_every_s=3600)
    for step in (1, 2):
        record = {"step": step, "step_time_s": 1.0, "step_images": 2, "loss": 1.0, "lr": 1e-4}
        reporter.on_step(record, epoch=0, global_step=step)
    reporter.event("checkpoint", 0, 2, epoch_step=2, reason="steps")
    assert [(r["kind"], r.get("global_step")) for r in sent if r["kind"] != "progress"] == [
        ("step", 1),
        ("step", 2),
        ("event", 2),
    ]


def test_bucket_runs_of_one_name_stage_apart_and_the_bucket_is_the_record(moto_server, tmp_path):
    """Runs of one name in two buckets stage in two folders on the driver's machine; a run staged here
    earlier and gone on with elsewhere resumes from the bucket's metrics, not from this staging folder's."""
    query = "?" + urlencode(moto_server.options)
    fs = pafs.S3FileSystem(**moto_server.options, allow_bucket_creation=True)
    for bucket in ("stage-a", "stage-b"):
        fs.create_dir(bucket)
    staging = str(tmp_path / "staging")

    def run(storage: str, who: str, step: int) -> RunDir:
        run_dir = RunDir(storage + query, "exp1", staging_root=staging).mkdir()
        run_dir.append_metrics([{"kind": "step", "run": who, "global_step": step}])
        run_dir.sync()
        return run_dir

    a = run("s3://stage-a/runs", "a", 1)
    b = run("s3://stage-b/experiments", "b", 1)
    assert [r["run"] for r in read_metrics(fetch_file(join_uri(b.uri, METRICS_FILE), str(tmp_path)))] == ["b"]
    elsewhere = read_bytes(join_uri(a.uri, METRICS_FILE)) + b'{"kind": "step", "run": "a", "global_step": 2}\n'
    write_bytes(join_uri(a.uri, METRICS_FILE), elsewhere)  # another machine resumed run a and went on
    again = run("s3://stage-a/runs", "a", 3)
    assert [r["global_step"] for r in again.read_metrics()] == [1, 2, 3]
