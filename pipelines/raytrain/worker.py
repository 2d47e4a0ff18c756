"""What each Ray Train worker runs: build through core, resume or fine-tune, train epochs, evaluate, report.

Every rank reports once per epoch (``ray.train.report`` is a barrier); rank 0 attaches the checkpoint
that ``TrainState`` writes. In between, every ``train.checkpoint_every_steps`` steps and on a preemption
notice (``step_checkpoints``), a mid-epoch report carries a checkpoint too; its metrics are ``epoch`` and
``epochs_done`` of the last finished epoch, ``data_epoch`` and ``epoch_step`` (where in the epoch in
progress), ``global_step``, ``checkpoint_score`` = UNSCORED (below any epoch's) and ``step_checkpoint``
(the reason), which tells it from an epoch's report (Tune's callback passes only those on). The metrics
each epoch's report carries (and Tune's schedulers read):
``epoch`` (0-based index of the finished epoch), ``epochs_done`` (epoch + 1), ``global_step``, ``loss``
and every criterion term, ``lr``, ``images_per_s``, ``max_mem_mb``, ``epoch_time_s``, the validation
``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` on evaluated epochs, and ``checkpoint_score``.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from core.build import build_model
from core.checkpoint import load_model_weights
from core.criterion import SetCriterion
from core.evaluation import AP_KEYS
from core.postprocess import PostProcess
from pipelines.engine import (
    build_lr_scheduler,
    build_optimizer,
    freeze_zero_lr_params,
    live_lr_scale,
    peak_memory_mb,
    realign_lr_scheduler,
    steps_per_epoch,
    train_one_epoch,
)
from pipelines.job_config import JobConfig
from pipelines.raytrain.metrics import StepReporter
from pipelines.raytrain.state import SCORE_KEY, UNSCORED, TrainState
from pipelines.raytrain.step_checkpoints import STEP_CHECKPOINT_KEY, StepCheckpoints, resume_step
from pipelines.raytrain.worker_config import WorkerConfig
from pipelines.raytrain.worker_context import (
    WorkerContext,
    mean_across_workers,
    seed_everything,
    seed_step,
    shard_batches,
)
from pipelines.raytrain.worker_eval import distributed_evaluate, load_val_ground_truth

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (``config``: ``WorkerConfig.to_loop_config()``)."""
    cfg = WorkerConfig.from_loop_config(config)
    job, ctx = cfg.job, WorkerContext.current(cfg.job)
    seed_everything(job.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    # From the live world size: an elastic run restarted on fewer workers takes more steps per epoch.
    epoch_steps = steps_per_epoch(
        cfg.train_rows, ctx.world_size, job.data.batch_size_per_worker, job.train.grad_accum_steps
    )
    state, criterion, postprocessor, notes = build_train_state(cfg, ctx, epoch_steps)
    reporter = StepReporter(cfg.sink if ctx.rank == 0 else None, job.train, ctx, epoch_steps)
    resumed = state.epoch >= 0 or state.epoch_step > 0
    reporter.event("resume" if resumed else "start", state.start_epoch, state.global_step, epoch_step=state.epoch_step)
    for note in notes:
        reporter.warn(note)
    coco_gt = load_val_ground_truth(job) if ctx.rank == 0 and job.train.eval_every else None
    if state.start_epoch >= job.train.epochs and state.history:
        # Restored after its last epoch (the driver died between the final checkpoint and the end of
        # fit): report that epoch again, so the run's result, and a Tune trial's, carries it.
        ray.train.report(state.history[-1])
        return

    step_checkpoints = StepCheckpoints(job.train.checkpoint_every_steps, ctx.rank)
    for epoch in range(state.start_epoch, job.train.epochs):
        first_step = state.epoch_step  # 0 unless a mid-epoch checkpoint put this group inside the epoch
        seed_step(job.train.seed, epoch, first_step, ctx.rank)
        state.data_epoch = epoch
        if cfg.epoch_clock is not None:  # before asking for the epoch's data, on every rank
            ray.get(cfg.epoch_clock.set.remote(epoch))
        drawn_epochs: set[int] = set()
        epoch_start = time.time()

        def on_step(record: dict[str, Any], epoch: int = epoch, first_step: int = first_step) -> None:
            state.global_step += 1
            state.epoch_step = first_step + record["step"]
            state.epoch_images += record["step_images"] * ctx.world_size  # equal shards: every rank's count
            reporter.on_step({**record, "step": state.epoch_step}, epoch, state.global_step)
            maybe_inject_fault(job, ctx.rank, state.global_step)
            # Dropout draws are a function of the step, so a restart draws what the uninterrupted run drew.
            seed_step(job.train.seed, epoch, state.epoch_step, ctx.rank)
            reason = step_checkpoints.due(state.global_step, state.epoch_step, epoch_steps, record["step_time_s"])
            if reason is not None:
                reporter.event("checkpoint", epoch, state.global_step, epoch_step=state.epoch_step, reason=reason)
                state.report(step_checkpoint_metrics(state, reason), job, cfg.dataset.model_dump(mode="json"), ctx.rank)

        stats = train_one_epoch(
            state.model,
            criterion,
            shard_batches(
                "train",
                job,
                ctx.device,
                epoch,
                drawn_epochs=drawn_epochs,
                skip_batches=first_step * job.train.grad_accum_steps,
            ),
            state.optimizer,
            state.scheduler,
            device=ctx.device,
            amp_dtype=ctx.amp_dtype,
            scaler=state.scaler,
            grad_accum_steps=job.train.grad_accum_steps,
            clip_max_norm=job.train.clip_max_norm,
            on_step=on_step,
        )
        state.epoch_step = state.epoch_images = 0
        reporter.flush()
        metrics = epoch_metrics(stats, state, ctx, epoch, time.time() - epoch_start)

        if evaluation_due(job, epoch):
            eval_start = time.time()
            val_batches = shard_batches("val", job, ctx.device, epoch)
            ap, vis = distributed_evaluate(
                state.model,
                postprocessor,
                val_batches,
                job=job,
                ctx=ctx,
                coco_gt=coco_gt,
                dataset=cfg.dataset,
                on_batch=lambda n: reporter.eval_progress(n, cfg.dataset.num_val),
                warn=reporter.warn,
            )
            if ctx.rank == 0:
                ap["eval_time_s"] = time.time() - eval_start
                reporter.send_eval(ap, epoch, state.global_step, vis)
                metrics.update({k: ap[k] for k in AP_KEYS})
            metrics[SCORE_KEY] = ap["AP"] if ap is not None else UNSCORED
        else:
            # Epochs without evaluation rank below any evaluated one; runs without any evaluation rank
            # by the negated loss.
            metrics[SCORE_KEY] = UNSCORED if job.train.eval_every else -metrics["loss"]
        metrics["epoch_time_s"] = time.time() - epoch_start
        state.epoch, state.data_epoch = epoch, epoch + 1
        state.history.append(metrics)
        reporter.send_epoch(metrics, drawn_epochs)
        state.report(metrics, job, cfg.dataset.model_dump(mode="json"), ctx.rank)


def no_forward_buffer_sync(ddp: type = torch.nn.parallel.DistributedDataParallel) -> dict[str, bool]:
    """DDP's option that stops it broadcasting buffers before every forward: FrozenBatchNorm's never change.
    torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers`` (the old name warns there, the new
    one is a TypeError before). Every rank builds the same buffers, so the old name's skipped sync at wrap
    time changes nothing."""
    new = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


def build_train_state(
    cfg: WorkerConfig, ctx: WorkerContext, epoch_steps: int
) -> tuple[TrainState, SetCriterion, PostProcess, list[str]]:
    """Model, optimizer, scheduler and scaler, restored from Ray's latest checkpoint or fine-tuned.

    The lr is scaled to the live worker count (``live_lr_scale``: train.lr is the lr at max_workers),
    and a checkpoint of another worker count gets this group's lr and its point in the schedule.

    Returns:
        The state; the criterion and the post-processor (dataset category ids) that ``build_model``
        made with the model, on the worker's device; warnings for the person running the job.
    """
    job = cfg.job
    resume = ray.train.get_checkpoint()
    # ImageNet backbone weights only matter for a fresh start (fetched on the driver by preflight).
    fresh = resume is None and cfg.weights is None
    model, criterion, postprocessor = build_model(
        job.detr_config(), load_backbone_weights=fresh, label_map=cfg.dataset.label_to_category_id
    )
    if resume is None and cfg.weights is not None:
        load_model_weights(model, ray.get(cfg.weights))
        log.info("rank %d fine-tunes from %s", ctx.rank, job.train.finetune_from)
    freeze_zero_lr_params(model, job.train)  # before DDP, which hooks every parameter that wants a gradient
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=no_forward_buffer_sync())
    lr_scale = live_lr_scale(ctx.world_size, job.train)
    if lr_scale != 1 and ctx.rank == 0:
        log.warning("training on %d of %d workers: lr scaled by %.3g", ctx.world_size, job.train.max_workers, lr_scale)
    optimizer = build_optimizer(model, job.train, lr_scale)
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(optimizer, job.train, epoch_steps),
        scaler=torch.amp.GradScaler(ctx.device.type) if ctx.amp_dtype == torch.float16 else None,
    )
    base_lrs = list(state.scheduler.base_lrs)  # this worker group's, before a checkpoint's replace them
    notes = []
    if resume is not None:
        state.restore_from_ray(resume)
        # A mid-epoch checkpoint: this group's step of the epoch after the images trained on (never past
        # the epoch's last step: a resized group may have fewer steps than there were images left).
        step_images = ctx.world_size * job.data.batch_size_per_worker * job.train.grad_accum_steps
        state.epoch_step = min(
            resume_step(state.epoch_images, ctx.world_size, job.data.batch_size_per_worker, job.train.grad_accum_steps),
            max(epoch_steps - 1, 0),
        )
        state.epoch_images = state.epoch_step * step_images
        log.info("rank %d resumes after epoch %d, at step %d of the next", ctx.rank, state.epoch, state.epoch_step)
        saved_step = state.scheduler.last_epoch
        if realign_lr_scheduler(state.scheduler, state.start_epoch * epoch_steps + state.epoch_step, base_lrs):
            notes.append(
                realign_note(saved_step, state.scheduler.last_epoch, state.start_epoch, epoch_steps, ctx.world_size)
            )
    return state, criterion.to(ctx.device), postprocessor.to(ctx.device), notes


def realign_note(saved_step: int, step: int, epoch: int, epoch_steps: int, world_size: int) -> str:
    """The console's line for a resume whose lr schedule ``realign_lr_scheduler`` moved from the
    checkpoint's optimizer step ``saved_step`` to ``step`` (epoch ``epoch``), or only rescaled."""
    where = f"epoch {epoch}, step {step - epoch * epoch_steps} of {epoch_steps} on {world_size} workers"
    if saved_step == step:
        return f"lr rescaled for {world_size} workers ({where})"
    return (
        f"lr schedule moved from optimizer step {saved_step} to {step} ({where}): another worker count, "
        "batch size or grad_accum_steps than the checkpoint's, or images skipped while decoding ended an "
        "epoch early"
    )


def step_checkpoint_metrics(state: TrainState, reason: str) -> dict[str, Any]:
    """A mid-epoch report: where the run is, a score below every epoch's, and the reason (STEP_CHECKPOINT_KEY)."""
    return {
        "epoch": state.epoch,
        "epochs_done": state.epoch + 1,
        "data_epoch": state.data_epoch,
        "epoch_step": state.epoch_step,
        "global_step": state.global_step,
        SCORE_KEY: UNSCORED,
        STEP_CHECKPOINT_KEY: reason,
    }


def evaluation_due(job: JobConfig, epoch: int) -> bool:
    """Every ``train.eval_every`` epochs and after the last one (never when eval_every is 0)."""
    every, epochs = job.train.eval_every, job.train.epochs
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


def epoch_metrics(
    stats: dict[str, float], state: TrainState, ctx: WorkerContext, epoch: int, train_time: float
) -> dict[str, Any]:
    """The epoch's report: loss terms averaged across workers, counters, throughput, memory."""
    images = stats["images"]
    metrics = mean_across_workers(stats, ctx.device)
    metrics.pop("images", None)
    metrics.update(
        epoch=epoch,
        epochs_done=epoch + 1,
        global_step=state.global_step,
        images_per_s=images * ctx.world_size / max(train_time, 1e-9),
        lr=state.optimizer.param_groups[0]["lr"],
        max_mem_mb=peak_memory_mb(ctx.device),
    )
    return metrics


def maybe_inject_fault(job: JobConfig, rank: int, global_step: int) -> None:
    """Tests only (``train.fault_injection``): the chosen rank exits once, at the chosen optimizer step."""
    fi = job.train.fault_injection
    if fi is None or rank != fi.rank or global_step != fi.global_step or os.path.exists(fi.marker):
        return
    with open(fi.marker, "w") as f:
        f.write(f"worker rank {rank} killed at global step {global_step}\n")
    log.warning("fault injection: rank %d exits at global step %d", rank, global_step)
    os._exit(1)
