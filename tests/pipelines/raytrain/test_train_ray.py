"""End to end on local Ray: 2 CPU workers on the tiny generated dataset, checkpoints, resume, a killed worker."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from s3_servers import CREDENTIALS, object_parts

from core.checkpoint import FORMAT, read_checkpoint
from core.predictor import Predictor
from pipelines.job_config import load_job_config
from pipelines.raytrain.run_dir import latest_history
from pipelines.raytrain.state import CHECKPOINT_FILE, fetch_checkpoint_file
from pipelines.raytrain.training import run_training
from pipelines.storage import filesystem_for, join_uri, list_file_sizes
from pipelines.train import config_from_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS_PER_EPOCH = 4  # 16 train images / (2 workers x 2 images)


def _kinds(records, kind):
    return [r for r in records if r.get("kind") == kind]


def _final_state(outcome):
    ckpt = outcome.result.checkpoint
    assert ckpt is not None
    with ckpt.as_directory() as d:  # the folder itself, or a local copy of a bucket's
        return read_checkpoint(os.path.join(d, CHECKPOINT_FILE))


@pytest.fixture(scope="module")
def two_epoch_run(ray_local, tmp_path_factory, tiny_overrides):
    storage = tmp_path_factory.mktemp("runs")
    job = load_job_config(
        preset="tiny", overrides=tiny_overrides(storage, "two_epochs", 'train.loggers=["tensorboard"]')
    )
    return run_training(job)


def test_two_workers_two_epochs(two_epoch_run):
    outcome = two_epoch_run
    assert outcome.error is None
    records = outcome.run_dir.read_metrics()

    epochs = _kinds(records, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    # The run is deterministic (seeded data order, augmentation and init; the same losses run after run):
    # 6.570 -> 6.405 (-2.5 %). No optimizer step gives 6.727 -> 6.936, an lr ten times too small 6.700 -> 6.828.
    assert epochs[1]["loss"] < 0.99 * epochs[0]["loss"], [e["loss"] for e in epochs]

    steps = _kinds(records, "step")
    assert [s["global_step"] for s in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "lr_backbone", "images_per_s", "max_mem_mb"):
        assert key in steps[0], key

    # AP by pycocotools on all 5 val images (split 3 + 2 over the workers), after each epoch.
    evals = _kinds(records, "eval")
    assert [e["epoch"] for e in evals] == [0, 1]
    assert all(e["num_eval_images"] == 5 for e in evals)
    assert all(0.0 <= e[k] <= 1.0 or e[k] == -1.0 for e in evals for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert outcome.final_ap == {k: evals[-1][k] for k in outcome.final_ap}

    # A checkpoint per epoch, in core's format with the training state.
    state = _final_state(outcome)
    assert state.source_format == FORMAT
    assert state.extra["epoch"] == 1 and state.extra["global_step"] == 2 * STEPS_PER_EPOCH
    assert {"optimizer", "scheduler", "scaler", "history"} <= set(state.extra)
    assert len(state.extra["history"]) == 2
    assert json.loads(state.meta["job_config"])["train"]["name"] == "two_epochs"
    ckpt_dirs = sorted(p.name for p in outcome.run_dir.path.iterdir() if p.name.startswith("checkpoint_epoch"))
    assert ckpt_dirs == ["checkpoint_epoch0000", "checkpoint_epoch0001"]

    files = {p.name for p in outcome.run_dir.path.iterdir()}
    assert {
        "config.json",
        "data_report.json",
        "metrics.jsonl",
        "ap_table.md",
        "loss.png",
        "ap.png",
        "val_images",
    } <= files
    assert json.loads((outcome.run_dir.path / "status.json").read_text())["state"] == "finished"
    report = json.loads((outcome.run_dir.path / "data_report.json").read_text())
    assert report == outcome.data_report
    assert {k: (r["num_images"], r["skipped"]) for k, r in report.items()} == {"train": (16, 0), "val": (5, 0)}
    assert len(list((outcome.run_dir.path / "val_images").glob("*.png"))) == 2

    # train.loggers=["tensorboard"]: rank 0's numbers, each step once, in the run directory's event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(outcome.run_dir.path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "images_per_s", "max_mem_mb"):
        assert scalars[f"train/{key}"] == [(s["global_step"], pytest.approx(s[key])) for s in steps], key
    assert [step for step, _ in scalars["val/AP"]] == [e["global_step"] for e in evals]
    assert [step for step, _ in scalars["epoch/loss"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert len(events.Tags()["images"]) == 2


def test_evaluate_reproduces_the_training_ap(two_epoch_run):
    """Given the run directory, evaluation scores its best epoch's checkpoint (ties: the later epoch)."""
    from pipelines.evaluate import config_from_args as eval_config_from_args
    from pipelines.evaluate import parse_args
    from pipelines.raytrain.evaluation import run_evaluation
    from pipelines.raytrain.preflight import open_checkpoint_arg

    evals = _kinds(two_epoch_run.run_dir.read_metrics(), "eval")
    best = max(evals, key=lambda r: (r["AP"], r["epoch"]))
    out = two_epoch_run.run_dir.path / "eval_out"
    args = parse_args(["--checkpoint", str(two_epoch_run.run_dir.path), "--num-workers", "2", "--out", str(out)])
    checkpoint, ckpt = open_checkpoint_arg(args.checkpoint, "evaluate")
    assert checkpoint == str(two_epoch_run.run_dir.path / f"checkpoint_epoch{best['epoch']:04d}")
    stats = run_evaluation(eval_config_from_args(ckpt, args), ckpt, out_dir=args.out)
    assert stats["num_eval_images"] == 5
    for k in two_epoch_run.final_ap:
        assert stats[k] == pytest.approx(best[k], abs=1e-6), k
    assert (out / "ap_table.md").is_file() and list((out / "val_images").glob("*.png"))
    assert json.loads((out / "data_report.json").read_text())["val"]["num_images"] == 5


def _fault(tmp_path, max_failures, global_step=STEPS_PER_EPOCH + 1):
    fault = {"rank": 1, "global_step": global_step, "marker": str(tmp_path / "killed")}
    return [f"train.fault_injection={json.dumps(fault)}", f"train.max_failures={max_failures}", "train.eval_every=0"]


def _assert_same_weights(outcome, reference):
    """Bit for bit: the same batches in the same order, with the same optimizer state, give the same weights."""
    got, want = _final_state(outcome).model, _final_state(reference).model
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"


def test_resume_continues_where_the_run_stopped(
    ray_local, seaweedfs_server, monkeypatch, tmp_path, tiny_overrides, two_epoch_run
):
    """On a bucket of a real S3 server: the run stops, its driver's local files go, and `--resume
    s3://...` continues it from the checkpoint in the bucket. (Local run directories resume through the
    same Ray Train restore that the killed-worker test below takes.)"""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # RunDir stages a bucket run under ~/.cache
    seaweedfs_server.create_bucket("runs")
    base = tiny_overrides(f"s3://runs/resume-test{seaweedfs_server.endpoint_query}", "resume")
    base.append("train.checkpoint_every_steps=2")
    # The first attempt dies at step 3 of its second epoch and may not retry: the run stops with its
    # checkpoint of step 2 of that epoch (global step 6) as the latest.
    kill = STEPS_PER_EPOCH + 3
    stopped = run_training(load_job_config(preset="tiny", overrides=base + _fault(tmp_path, 0, kill)))
    assert stopped.error is not None
    assert (tmp_path / "killed").exists()
    assert [e["epoch"] for e in _kinds(stopped.run_dir.read_metrics(), "epoch")] == [0]
    checkpoints = [r for r in _kinds(stopped.run_dir.read_metrics(), "event") if r["event"] == "checkpoint"]
    assert [(c["epoch"], c["epoch_step"], c["global_step"]) for c in checkpoints] == [(0, 2, 2), (1, 2, 6)]
    # The mid-epoch one (no score) is kept as the latest beside the best epoch's; step 2's was let go.
    files = list_file_sizes(stopped.run_dir.uri)
    assert sorted({rel.split("/")[0] for rel in files if rel.startswith("checkpoint_") and "/" in rel}) == [
        "checkpoint_epoch0000",
        "checkpoint_step00000006",
    ]
    mid = join_uri(stopped.run_dir.uri, "checkpoint_step00000006")
    # Ray Train uploaded the checkpoint in parts (pyarrow's are 10 MiB): the server put them together.
    assert object_parts(*filesystem_for(join_uri(mid, CHECKPOINT_FILE))) >= 2
    local_mid = fetch_checkpoint_file(mid, str(tmp_path))
    saved = read_checkpoint(local_mid)
    assert (saved.extra["epoch"], saved.extra["data_epoch"], saved.extra["epoch_step"]) == (0, 1, 2)
    assert (saved.extra["global_step"], saved.extra["epoch_images"]) == (6, 2 * 2 * 2)
    assert Predictor.from_checkpoint(local_mid).model is not None  # inference reads it like any other
    # The driver is gone with its machine: the resumed run has only what the bucket holds.
    shutil.rmtree(stopped.run_dir.path)

    # Resume the stopped run from its directory, as a user would.
    args = argparse.Namespace(resume=stopped.run_dir.uri, config=None, preset=None, overrides=[])
    job = config_from_args(args)
    assert job.train.name == "resume" and job.train.epochs == 2
    resumed = run_training(job)
    assert resumed.error is None

    records = resumed.run_dir.read_metrics()
    events = [r for r in _kinds(records, "event") if r["event"] == "resume"]
    assert events and (events[-1]["epoch"], events[-1]["epoch_step"], events[-1]["global_step"]) == (1, 2, 6)
    assert [e["epoch"] for e in _kinds(records, "epoch")] == [0, 1]
    # Steps 7 and 8 trained on the batches the uninterrupted run had there (the loss of a step is a
    # function of the weights and the batch), and the weights end where that run's ended.
    resumed_steps = {r["global_step"]: r["loss"] for r in latest_history(records, "step", "global_step")}
    reference = {r["global_step"]: r["loss"] for r in _kinds(two_epoch_run.run_dir.read_metrics(), "step")}
    assert resumed_steps == reference
    _assert_same_weights(resumed, two_epoch_run)

    state = _final_state(resumed)
    total = 2 * STEPS_PER_EPOCH
    assert state.extra["global_step"] == total
    assert [h["epoch"] for h in state.extra["history"]] == [0, 1]
    # The optimizer and scheduler continued: Adam's step count and the scheduler cover both epochs.
    adam_steps = {int(s["step"]) for s in state.extra["optimizer"]["state"].values()}
    assert adam_steps == {total}
    assert state.extra["scheduler"]["last_epoch"] == total


def test_killed_worker_is_replaced_and_the_run_finishes(ray_local, tmp_path, tiny_overrides, two_epoch_run):
    # Checkpoints at epoch ends only: the group restarts from epoch 0's.
    base = tiny_overrides(tmp_path / "runs", "killed", "train.checkpoint_every_steps=0")
    job = load_job_config(preset="tiny", overrides=base + _fault(tmp_path, 1))
    outcome = run_training(job)
    assert (tmp_path / "killed").exists()
    assert outcome.error is None

    records = outcome.run_dir.read_metrics()
    events = [r["event"] for r in _kinds(records, "event")]
    assert events == ["start", "resume"]
    resume = _kinds(records, "event")[1]
    assert resume["epoch"] == 1 and resume["global_step"] == STEPS_PER_EPOCH

    # Step STEPS_PER_EPOCH + 1 ran twice (before the kill and after the restart); the history keeps one.
    steps = latest_history(records, "step", "global_step")
    assert [s["global_step"] for s in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    state = _final_state(outcome)
    assert state.extra["epoch"] == 1 and state.extra["global_step"] == 2 * STEPS_PER_EPOCH
    # The restarted group's epoch 1 drew epoch 1's augmentation, though the dataset had run twice before.
    epochs = latest_history(records, "epoch", "epoch")
    assert [(e["epoch"], e["data_epochs"]) for e in epochs] == [(0, [0]), (1, [1])]
    assert torch.isfinite(torch.tensor([h["loss"] for h in state.extra["history"]])).all()
    _assert_same_weights(outcome, two_epoch_run)


def test_evaluate_an_authors_checkpoint(ray_local, tmp_path, tiny_data):
    """The authors' .pth format (raw COCO category ids, 91 classes) is scored on a COCO-format split."""
    from core.build import build_model
    from pipelines.evaluate import config_from_args as eval_config_from_args
    from pipelines.evaluate import parse_args
    from pipelines.raytrain.evaluation import run_evaluation
    from pipelines.raytrain.preflight import open_checkpoint_arg

    job = load_job_config(preset="tiny", overrides=["model.num_classes=91"])
    model, _, _ = build_model(job.detr_config())
    args = argparse.Namespace(**job.model.model_dump(), **job.matcher.model_dump(), **job.loss.model_dump())
    path = tmp_path / "authors.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 49}, path)

    args = parse_args(
        [
            "--checkpoint",
            str(path),
            "--data",
            tiny_data["root"],
            "--set",
            "data.val_ann=instances_val.json",
            "--set",
            "data.val_images=val",
            "--set",
            "data.val_short_side=96",
            "--set",
            "data.max_size=96",
            "--num-workers",  # the format is tested here; two-worker evaluation is the test above's
            "1",
        ]
    )
    _, ckpt = open_checkpoint_arg(args.checkpoint, "evaluate")
    assert ckpt.source_format == "authors"
    eval_job = eval_config_from_args(ckpt, args)
    assert eval_job.data.category_ids == "raw" and eval_job.model.num_classes == 91
    stats = run_evaluation(eval_job, ckpt)
    assert stats["num_eval_images"] == 5
    assert 0.0 <= stats["AP"] <= 1.0
