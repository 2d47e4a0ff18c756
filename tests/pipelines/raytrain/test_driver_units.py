"""Driver-side helpers of a Ray Train run, one function at a time (no Ray cluster): mid-epoch checkpoint
decisions, the training state's names and restore, metrics lines, pre-flight checks, failure lines,
tracker parameters and config merging."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import ray.train
import ray.train.collective
import torch

from pipelines.job_config import deep_merge, load_job_config
from pipelines.raytrain import state as state_module
from pipelines.raytrain.errors import describe_failure
from pipelines.raytrain.metrics import MetricsPump, StepReporter
from pipelines.raytrain.preflight import PreflightError, check_data, check_resources, check_writable, resolve
from pipelines.raytrain.run_dir import RunDir
from pipelines.raytrain.state import TrainState
from pipelines.raytrain.step_checkpoints import StepCheckpoints
from pipelines.raytrain.tracking import flatten_config


@pytest.fixture
def no_notice(monkeypatch):
    """No preemption notice, and rank 0's measured step time is everyone's (as on one worker)."""
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: None)
    monkeypatch.setattr(ray.train.collective, "broadcast_from_rank_zero", lambda value: value)


def test_no_step_checkpoint_on_an_epochs_last_step(no_notice):
    """Step 10 of a 10-step epoch is on the cadence of 5, but the epoch's own checkpoint comes next."""
    steps = StepCheckpoints(5, rank=0)
    assert steps.due(global_step=10, epoch_step=10, epoch_steps=10, step_time_s=0.1) is None
    assert steps.due(global_step=15, epoch_step=5, epoch_steps=10, step_time_s=0.1) == "every_steps"


def test_the_step_cadence_counts_the_runs_steps(no_notice):
    """Every 4 steps of the run (a restarted group keeps it): due at global step 12, not 14."""
    steps = StepCheckpoints(4, rank=0)
    assert steps.due(global_step=12, epoch_step=2, epoch_steps=10, step_time_s=0.1) == "every_steps"
    assert steps.due(global_step=14, epoch_step=4, epoch_steps=10, step_time_s=0.1) is None


def test_the_step_time_is_measured_after_the_warm_up(no_notice):
    """The first 5 steps (warm-up) are not timed; the next 5 are, and then the cadence is set."""
    steps = StepCheckpoints(None, rank=0)
    for step in range(1, 10):
        steps.due(global_step=step, epoch_step=step, epoch_steps=1000, step_time_s=float(step))
    assert not steps.measured and steps.every is None
    steps.due(global_step=10, epoch_step=10, epoch_steps=1000, step_time_s=10.0)
    assert steps.measured
    assert steps.step_times == [6.0, 7.0, 8.0, 9.0, 10.0]
    assert steps.every == 75  # 600 s of 8 s steps (the median)


def test_checkpoint_folder_names():
    """An epoch's end: checkpoint_epoch0003; in the middle of one: the run's global step."""
    assert TrainState(None, None, None, epoch=3, global_step=40).checkpoint_dir_name == "checkpoint_epoch0003"
    mid = TrainState(None, None, None, epoch=3, global_step=40, epoch_step=5)
    assert mid.checkpoint_dir_name == "checkpoint_step00000040"


def test_an_old_checkpoint_without_data_epoch_draws_the_next_epochs_data(monkeypatch):
    """A checkpoint of epoch 2 written before data_epoch was saved resumes on epoch 3's data order."""
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    extra = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 2, "global_step": 30}
    monkeypatch.setattr(state_module, "read_checkpoint", lambda path: SimpleNamespace(model={}, extra=extra))
    monkeypatch.setattr(state_module, "load_model_weights", lambda model, weights: None)
    state = TrainState(layer, opt, sched)
    state.restore("/ckpt/checkpoint.pt")
    assert (state.epoch, state.global_step, state.data_epoch, state.epoch_step) == (2, 30, 3, 0)


def test_images_per_second_counts_every_worker():
    """4 workers, 2 images each in 0.5 s a step: 16 images/s for the run."""
    ctx = SimpleNamespace(world_size=4, device=torch.device("cpu"))
    job = load_job_config(preset="tiny")
    reporter = StepReporter(None, job.train, ctx, steps_per_epoch=10)
    record = {"step": 1, "loss": 1.0, "lr": 1e-4, "step_images": 2, "step_time_s": 0.5}
    line = reporter._line([record, {**record, "step": 2}], epoch=0, global_step=2)
    assert line["images_per_s"] == pytest.approx(16.0)
    assert line["step_images"] == 4 and line["step_time_s"] == pytest.approx(0.5)


def test_progress_records_stay_out_of_metrics_jsonl(tmp_path):
    """metrics.jsonl keeps the steps; the console's progress lines (training and evaluation) are not in it."""
    run_dir = RunDir(str(tmp_path), "run").mkdir()
    pump = MetricsPump(None, run_dir, out=None)
    pump._write(
        [
            {"kind": "step", "epoch": 0, "global_step": 1, "loss": 1.0},
            {"kind": "progress", "epoch": 0, "step": 1},
            {"kind": "eval_progress", "images": 4, "num_val": 8},
        ]
    )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["step"]


def test_an_elastic_run_needs_room_for_its_smallest_group():
    """num_workers [1, 4] on 2 CPUs: one worker plus one CPU for decoding fits; it grows later."""
    job = load_job_config(preset="tiny", overrides=["train.num_workers=[1, 4]", "train.cpus_per_worker=1"])
    check_resources(job, {"CPU": 2.0}, strict=True)
    fixed = load_job_config(preset="tiny", overrides=["train.num_workers=4", "train.cpus_per_worker=1"])
    with pytest.raises(PreflightError, match="CPU: need 5"):
        check_resources(fixed, {"CPU": 2.0}, strict=True)


def test_a_missing_image_folder_is_named(tmp_path):
    """The annotation file is there, the images folder is not: the error names data.train_images."""
    job = load_job_config(preset="tiny", overrides=[f"data.root={tmp_path}", "demo_data=null"])
    ann = job.data.ann_uri("train")
    os.makedirs(os.path.dirname(ann), exist_ok=True)
    with open(ann, "w") as f:
        f.write("{}")
    with pytest.raises(PreflightError, match="data.train_images: folder not found"):
        check_data(job, ("train",))


def test_finetune_from_becomes_an_absolute_path(tmp_path, monkeypatch):
    """A relative train.finetune_from is resolved on the driver: workers run in other directories."""
    monkeypatch.chdir(tmp_path)
    job = resolve(load_job_config(preset="tiny", overrides=["train.finetune_from=weights/best.pth"]))
    assert job.train.finetune_from == str(tmp_path / "weights" / "best.pth")


def test_a_storage_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    """A folder without write permission (root ignores modes, so os.access says it here)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PreflightError, match="train.storage_path='x' is not writable"):
        check_writable(str(tmp_path / "runs"), "train.storage_path='x'", 5.0)


def test_a_failure_shows_the_innermost_cause():
    """Ray's wrapped traceback: the last "SomeError: message" line is the one shown."""
    text = (
        "ray::RayTrainWorker.run() failed\n"
        "Traceback (most recent call last):\n"
        '  File "train.py", line 3, in run\n'
        "RuntimeError: outer\n"
        "ValueError: the real cause"
    )
    assert describe_failure(RuntimeError(text)) == "ValueError: the real cause"


def test_flatten_config_keeps_empty_sections():
    """An empty dict field (train.worker_resources={}) is one parameter, "{}", not dropped."""
    assert flatten_config({"train": {"worker_resources": {}, "lr": 2e-4}}) == {
        "train.worker_resources": "{}",
        "train.lr": "0.0002",
    }


def test_deep_merge_merges_nested_sections():
    """Dicts merge key by key; the base is left as it was."""
    base = {"a": {"x": 1, "y": 2}, "b": [1]}
    assert deep_merge(base, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}, "b": [1]}
    assert base == {"a": {"x": 1, "y": 2}, "b": [1]}


def test_a_config_file_changes_only_its_fields_of_the_preset(tmp_path):
    """{"train": {"lr": 1e-4}} over the tiny preset: tiny's other train fields stay."""
    tiny = load_job_config(preset="tiny")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"lr": 1e-4}}))
    job = load_job_config(path, preset="tiny")
    assert job.train.lr == 1e-4
    assert job.train.model_dump(exclude={"lr"}) == tiny.train.model_dump(exclude={"lr"})
    assert job.model == tiny.model
