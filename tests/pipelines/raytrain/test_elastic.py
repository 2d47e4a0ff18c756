"""Elastic training without Ray: the worker range in the config, steps per epoch and the lr of a worker
group smaller than max, the schedule of a run resumed on another number of workers, and what
build_trainer hands to Ray Train (a (min, max) ScalingConfig, preemptions counted apart)."""

from __future__ import annotations

import pytest
import torch

from pipelines.engine import (
    build_lr_scheduler,
    build_optimizer,
    live_lr_scale,
    lr_factor,
    realign_lr_scheduler,
    steps_per_epoch,
)
from pipelines.job_config import ConfigError, load_job_config
from pipelines.raytrain.worker import realign_note


def test_worker_range_in_the_config():
    job = load_job_config(preset="tiny", overrides=["train.num_workers=[2, 8]"])
    t = job.train
    assert (t.min_workers, t.max_workers, t.elastic) == (2, 8, True)
    assert job.total_batch_size == 8 * job.data.batch_size_per_worker  # given at max
    assert job.model_dump(mode="json")["train"]["num_workers"] == [2, 8]  # config.json round-trips
    fixed = load_job_config(preset="tiny", overrides=["train.num_workers=3"]).train
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (3, 3, False)
    for bad, message in (
        ("[4, 2]", "train.num_workers: a [min, max] range needs min <= max"),
        ("[0, 2]", "train.num_workers: Input should be greater than or equal to 1"),
        ("0", "train.num_workers: Input should be greater than or equal to 1"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_job_config(preset="tiny", overrides=[f"train.num_workers={bad}"])
    with pytest.raises(ConfigError, match="train.worker_resources: .*GPU is set by"):
        load_job_config(preset="tiny", overrides=['train.worker_resources={"GPU": 1}'])


def test_steps_per_epoch_follow_the_live_workers():
    # 118287 COCO images, 4 per worker: 8 workers take 3696 steps, 4 take twice as many.
    assert steps_per_epoch(118287, 8, 4, 1) == 3696
    assert steps_per_epoch(118287, 4, 4, 1) == 7392
    assert steps_per_epoch(16, 2, 2, 1) == 4 and steps_per_epoch(16, 1, 2, 1) == 8
    assert steps_per_epoch(16, 2, 2, 3) == 2  # accumulation: ceil(4 / 3)
    assert steps_per_epoch(3, 2, 2, 1) == 0


def _model() -> torch.nn.Module:
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Linear(2, 2))  # "backbone.0.*": the backbone group
    model.head = torch.nn.Linear(2, 2)
    return model


def test_lr_scaled_to_the_live_worker_count():
    train = load_job_config(preset="tiny", overrides=["train.num_workers=[2, 8]"]).train
    assert live_lr_scale(8, train) == 1.0 and live_lr_scale(2, train) == 0.25
    full = {g["name"]: g["lr"] for g in build_optimizer(_model(), train).param_groups}
    half = {g["name"]: g["lr"] for g in build_optimizer(_model(), train, live_lr_scale(4, train)).param_groups}
    assert full == {"main": train.lr, "backbone": train.lr_backbone}
    assert half == {k: v / 2 for k, v in full.items()}


def test_resume_on_fewer_workers_rebases_and_realigns_the_schedule():
    """A checkpoint of 8 workers (4 steps an epoch) resumed on 4 (8 steps an epoch): the lr is half the
    8-worker lr at the same point of the schedule, in epochs."""
    train = load_job_config(
        preset="tiny", overrides=["train.num_workers=[4, 8]", "train.lr_schedule=cosine", "train.epochs=4"]
    ).train
    model = _model()
    opt8 = build_optimizer(model, train, live_lr_scale(8, train))
    sched8 = build_lr_scheduler(opt8, train, 4)
    for _ in range(4):  # epoch 0 on 8 workers
        opt8.step()
        sched8.step()
    state = {"optimizer": opt8.state_dict(), "scheduler": sched8.state_dict()}

    opt4 = build_optimizer(model, train, live_lr_scale(4, train))
    sched4 = build_lr_scheduler(opt4, train, 8)
    base4 = list(sched4.base_lrs)
    opt4.load_state_dict(state["optimizer"])
    sched4.load_state_dict(state["scheduler"])
    assert realign_lr_scheduler(sched4, 1 * 8, base4)
    assert realign_note(4, sched4.last_epoch, 1, 8, 4).startswith(
        "lr schedule moved from optimizer step 4 to 8 (epoch 1, step 0 of 8 on 4 workers): another worker count"
    )
    expected = [b * lr_factor(1.0, train) for b in base4]
    assert [g["lr"] for g in opt4.param_groups] == pytest.approx(expected)
    assert opt4.param_groups[0]["lr"] == pytest.approx(train.lr / 2 * lr_factor(1.0, train))
    # The next steps follow the 4-worker schedule: after 4 more steps, epoch 1.5.
    for _ in range(4):
        opt4.step()
        sched4.step()
    assert opt4.param_groups[0]["lr"] == pytest.approx(train.lr / 2 * lr_factor(1.5, train))
    # Same workers, same step: nothing to realign.
    assert not realign_lr_scheduler(sched4, 12, base4)


def test_build_trainer_hands_ray_the_range_and_the_preemption_budget():
    from pipelines.raytrain.run_datasets import PreparedData
    from pipelines.raytrain.training import build_trainer
    from pipelines.raytrain.worker_config import DatasetFacts

    job = load_job_config(
        preset="tiny",
        overrides=[
            "train.num_workers=[2, 4]",
            'train.worker_resources={"spot": 0.01}',
            "train.max_failures=1",
            "train.max_preemption_failures=7",
            "train.name=elastic",
        ],
    )
    facts = DatasetFacts(
        mode="contiguous", num_classes=3, category_ids=[1, 2, 3], category_names={1: "a", 2: "b", 3: "c"}
    )
    data = PreparedData(datasets={}, facts=facts, steps_per_epoch=4, start_epoch=0, train_rows=32)
    trainer = build_trainer(job, data)
    scaling, failure = trainer.scaling_config, trainer.run_config.failure_config
    assert scaling.num_workers == (2, 4) and scaling.elastic_resize_monitor_interval_s == 60.0
    assert scaling.resources_per_worker == {"CPU": 1.0, "spot": 0.01}
    assert (failure.max_failures, failure.max_preemption_failures) == (1, 7)
    fixed = load_job_config(preset="tiny", overrides=["train.name=fixed"])
    assert build_trainer(fixed, data).scaling_config.num_workers == 2


def test_a_resume_trains_with_its_own_weight_decay(tmp_path):
    """`--resume RUN --set train.weight_decay=X` trains with X: the optimizer's moments come from the
    checkpoint, its weight decay from this run's config."""
    from tiny import tiny_config

    from core import build_model
    from pipelines.raytrain.state import TrainState

    def state(weight_decay: float) -> tuple[TrainState, object]:
        job = load_job_config(preset="tiny", overrides=[f"train.weight_decay={weight_decay}"])
        model = build_model(tiny_config())[0]
        optimizer = build_optimizer(model, job.train, 1.0)
        return TrainState(model, optimizer, build_lr_scheduler(optimizer, job.train, 4)), job

    before, job = state(1e-4)
    for p in before.model.parameters():
        p.grad = torch.ones_like(p)
    before.optimizer.step()
    path = str(tmp_path / "checkpoint.pt")
    before.save(path, job, {})
    after, _ = state(0.05)
    after.restore(path)
    assert {g["weight_decay"] for g in after.optimizer.param_groups} == {0.05}
    moments = [after.optimizer.state[p]["exp_avg"] for p in after.model.parameters() if p.requires_grad]
    assert moments and all(bool((m != 0).all()) for m in moments)  # the checkpoint's
