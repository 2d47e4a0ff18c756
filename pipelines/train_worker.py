"""What each Ray Train worker runs: build through core, resume or fine-tune, train epochs, evaluate, checkpoint.

One checkpoint per epoch, written by rank 0 to a temporary folder and handed to ``ray.train.report``;
every rank reports once per epoch (the call is a barrier). The checkpoint is one file,
``checkpoint.pt``, in core's format (``core.read_checkpoint`` and ``pipelines/evaluate.py`` read it),
with the training state added: optimizer, scheduler, scaler, epoch, global_step, history, and the
whole JobConfig as JSON in ``meta``.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from core.build import build_model
from core.checkpoint import load_model_weights, read_checkpoint, save_checkpoint
from core.coco_eval import AP_KEYS, coco_evaluate, load_coco_gt
from core.postprocess import PostProcess
from pipelines.coco import load_json
from pipelines.config import JobConfig
from pipelines.data import iter_batches
from pipelines.engine import (
    build_lr_scheduler,
    build_optimizer,
    evaluate,
    freeze_zero_lr_params,
    live_lr_scale,
    realign_lr_scheduler,
    resolve_amp_dtype,
    steps_per_epoch,
    train_one_epoch,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SCORE_KEY = "checkpoint_score"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fetch_checkpoint_file(uri: str, dest_dir: str) -> str:
    """A local file for a checkpoint given as a path, a run checkpoint folder, http(s), s3:// or gs://."""
    from pipelines.run_outputs import is_remote, storage_filesystem

    if is_remote(uri):
        fs, path = storage_filesystem(uri)
        import pyarrow.fs as pafs

        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            path = f"{path}/{CHECKPOINT_FILE}"
        local = os.path.join(dest_dir, os.path.basename(path))
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return local
    if os.path.isdir(uri):
        return os.path.join(uri, CHECKPOINT_FILE)
    return uri


class _Progress:
    """Rank 0's step records: buffered and sent to the driver's MetricsSink every log_every_s."""

    def __init__(self, sink, job: JobConfig, world_size: int, steps_per_epoch: int, device: torch.device) -> None:
        self.sink = sink
        self.job = job
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.device = device
        self.buffer: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # step records not yet averaged into one line
        self.pending_at = (0, 0)  # (epoch, global_step) of the last pending record
        self.last_flush = time.monotonic()
        self.window_images = 0
        self.window_time = 0.0
        self.ema_step_s: float | None = None

    def send(self, records: list[dict[str, Any]]) -> None:
        if self.sink is not None:
            self.sink.log.remote(records)

    def on_step(self, record: dict[str, Any], epoch: int, global_step: int, remaining_steps: int) -> None:
        step_s = record["step_time_s"]
        self.ema_step_s = step_s if self.ema_step_s is None else 0.9 * self.ema_step_s + 0.1 * step_s
        self.window_images += record["step_images"] * self.world_size
        self.window_time += step_s
        self.pending.append(record)
        self.pending_at = (epoch, global_step)
        last_of_epoch = record["step"] == self.steps_per_epoch
        if len(self.pending) >= self.job.train.metrics_every_steps or last_of_epoch:
            self.buffer.append(self._line(self.pending, epoch, global_step))
            self.pending = []
        now = time.monotonic()
        if now - self.last_flush >= self.job.train.log_every_s or last_of_epoch:
            progress = {
                "kind": "progress",
                "time": time.time(),
                "epoch": epoch,
                "epochs": self.job.train.epochs,
                "step": record["step"],
                "steps_per_epoch": self.steps_per_epoch,
                "global_step": global_step,
                "loss": record["loss"],
                "lr": record["lr"],
                "images_per_s": self.window_images / max(self.window_time, 1e-9),
                "eta_s": remaining_steps * self.ema_step_s,
            }
            self.send(self.buffer + [progress])
            self.buffer = []
            self.last_flush = now
            self.window_images, self.window_time = 0, 0.0

    def _line(self, records: list[dict[str, Any]], epoch: int, global_step: int) -> dict[str, Any]:
        """One metrics line for the last len(records) steps: numbers averaged, lr and counters as of the last."""
        last = records[-1]
        line = {"kind": "step", "time": time.time(), "epoch": epoch, "global_step": global_step, **last}
        if len(records) > 1:
            for key in last:
                if key.startswith("loss") or key in ("class_error", "cardinality_error", "grad_norm"):
                    values = [r[key] for r in records if r.get(key) is not None]
                    line[key] = sum(values) / len(values) if values else None
            line["steps_averaged"] = len(records)
        seconds = sum(r["step_time_s"] for r in records)
        line["step_images"] = sum(r["step_images"] for r in records)
        line["step_time_s"] = seconds / len(records)
        line["images_per_s"] = line["step_images"] * self.world_size / max(seconds, 1e-9)
        line["max_mem_mb"] = peak_memory_mb(self.device)
        return line

    def flush(self) -> None:
        if self.pending:  # an epoch that ended short of steps_per_epoch
            self.buffer.append(self._line(self.pending, *self.pending_at))
            self.pending = []
        if self.buffer:
            self.send(self.buffer)
            self.buffer = []


def _mean_across_workers(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Epoch averages of every rank, averaged (the loss keys are the same on every rank)."""
    if not _distributed():
        return dict(stats)
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _records_to_array(records: list[dict]) -> np.ndarray:
    # (R, 7): image_id, x, y, w, h, score, category_id; much smaller to gather than dicts.
    if not records:
        return np.zeros((0, 7), np.float64)
    return np.array([[r["image_id"], *r["bbox"], r["score"], r["category_id"]] for r in records], dtype=np.float64)


def _array_to_records(arr: np.ndarray) -> list[dict]:
    return [
        {"image_id": int(a[0]), "bbox": [float(v) for v in a[1:5]], "score": float(a[5]), "category_id": int(a[6])}
        for a in arr
    ]


def distributed_evaluate(
    model,
    postprocessor,
    batches,
    *,
    job: JobConfig,
    device,
    amp_dtype,
    coco_gt,
    rank: int,
    label_names,
    num_val: int | None = None,
) -> tuple[dict[str, float] | None, list[dict]]:
    """Inference on this worker's val shard, detections gathered on rank 0 and scored by pycocotools.

    An image id seen on two workers is an error; fewer images than ``num_val`` is logged.

    Returns:
        (stats, vis) on rank 0, (None, []) elsewhere: the AP dict and the images collected for drawing.
    """
    records, image_ids, vis = evaluate(
        model,
        postprocessor,
        batches,
        device=device,
        amp_dtype=amp_dtype,
        num_vis=job.train.num_vis_images if rank == 0 else 0,
        vis_score_threshold=job.train.vis_score_threshold,
        pixel_mean=job.data.pixel_mean,
        pixel_std=job.data.pixel_std,
        label_names=label_names,
    )
    payload = (_records_to_array(records), np.asarray(image_ids, np.int64))
    if _distributed():
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
    else:
        gathered = [payload]
    if rank != 0:
        return None, []
    all_records = _array_to_records(np.concatenate([g[0] for g in gathered]))
    ids = np.concatenate([g[1] for g in gathered])
    all_ids, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        # Scoring an image twice would double its detections and bias AP: the val split must be a partition.
        raise RuntimeError(
            f"evaluation saw image ids more than once across workers: {all_ids[counts > 1][:10].tolist()}"
        )
    if num_val is not None and len(all_ids) != num_val:
        log.warning(
            "evaluated %d of the %d val images (images skipped at decode are counted in the data report)",
            len(all_ids),
            num_val,
        )
    stats = coco_evaluate(coco_gt, all_records, all_ids.tolist())
    stats["num_eval_images"] = len(all_ids)
    return stats, vis


def _load_gt(job: JobConfig):
    """pycocotools ground truth of the val split (crowd boxes included: COCOeval ignores them properly)."""
    return load_coco_gt(load_json(job.data.ann_uri("val"), job.data.storage_options))


def _batches(
    shard, job: JobConfig, device: torch.device, epoch: int, *, train: bool, drawn_epochs: set[int] | None = None
):
    """Model batches of this worker's shard: train drops the last partial batch (equal steps per worker)."""
    data = job.data
    batch_size = data.batch_size_per_worker if train else (job.train.eval_batch_size or data.batch_size_per_worker)
    return iter_batches(
        shard,
        batch_size,
        seed=data.seed,
        epoch=epoch,
        pixel_mean=data.pixel_mean,
        pixel_std=data.pixel_std,
        device=device,
        drop_last=train,
        prefetch_batches=data.prefetch_batches,
        shuffle_buffer_size=data.shuffle_buffer_size if train else 0,
        drawn_epochs=drawn_epochs,
    )


def _maybe_inject_fault(job: JobConfig, rank: int, global_step: int) -> None:
    fi = job.train.fault_injection
    if fi is None or rank != fi.rank or global_step != fi.global_step or os.path.exists(fi.marker):
        return
    with open(fi.marker, "w") as f:
        f.write(f"worker rank {rank} killed at global step {global_step}\n")
    log.warning("fault injection: rank %d exits at global step %d", rank, global_step)
    os._exit(1)


def _quiet_report_log(level: str) -> None:
    """Applies ``train.ray_log_level`` to the one Ray Train logger that LoggingConfig misses.

    Ray 2.60 logs every ``report`` with its whole metrics dict at INFO, on a logger named after its
    source file rather than under ``ray.train``.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(level)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function.

    Args:
        config: {"job": JobConfig as a JSON dict, "dataset_info": category map and sizes (small),
            "train_rows": rows of the train dataset per epoch, "sink": MetricsSink handle or None,
            "finetune_weights": ObjectRef of the state_dict to start from, or None}.
    """
    job = JobConfig.model_validate(config["job"])
    _quiet_report_log(job.train.ray_log_level)
    info = config["dataset_info"]
    sink = config.get("sink")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # From the live world size: an elastic run restarted on fewer workers takes more steps per epoch.
    epoch_steps = steps_per_epoch(
        int(config["train_rows"]), world, job.data.batch_size_per_worker, job.train.grad_accum_steps
    )
    device = ray.train.torch.get_device()
    amp_dtype = resolve_amp_dtype(job.train.amp, device)
    _seed_everything(job.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    resume = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    detr_cfg = job.detr_config()
    # ImageNet backbone weights only matter for a fresh start.
    fresh = resume is None and config.get("finetune_weights") is None
    model, criterion, _ = build_model(detr_cfg, load_backbone_weights=fresh)
    if resume is not None:
        with resume.as_directory() as d:
            ckpt = read_checkpoint(os.path.join(d, CHECKPOINT_FILE))
        load_model_weights(model, ckpt.model)
        state = ckpt.extra
        log.info("rank %d resumes after epoch %d", rank, state["epoch"])
    elif config.get("finetune_weights") is not None:
        load_model_weights(model, ray.get(config["finetune_weights"]))
        log.info("rank %d fine-tunes from %s", rank, job.train.finetune_from)

    freeze_zero_lr_params(model, job.train)  # before DDP, which hooks every parameter that wants a gradient
    # FrozenBatchNorm buffers never change: synced once at wrap time, not before every forward.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    criterion.to(device)
    postprocessor = PostProcess(num_select=100, label_map=info.get("label_to_category_id")).to(device)
    lr_scale = live_lr_scale(world, job.train)
    optimizer = build_optimizer(model, job.train, lr_scale)
    scheduler = build_lr_scheduler(optimizer, job.train, epoch_steps)
    base_lrs = list(scheduler.base_lrs)  # this worker group's, before a checkpoint's replace them
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if lr_scale != 1 and rank == 0:
        log.warning("training on %d of %d workers: lr scaled by %.3g", world, job.train.max_workers, lr_scale)

    start_epoch, global_step, history = 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        global_step = int(state["global_step"])
        history = list(state.get("history", []))
        if realign_lr_scheduler(scheduler, start_epoch * epoch_steps, base_lrs) and rank == 0:
            log.warning(
                "workers or steps per epoch changed since the checkpoint (now %d workers, %d steps): "
                "lr schedule realigned to epoch %d",
                world,
                epoch_steps,
                start_epoch,
            )

    progress = _Progress(sink if rank == 0 else None, job, world, epoch_steps, device)
    if rank == 0:
        progress.send(
            [
                {
                    "kind": "event",
                    "time": time.time(),
                    "event": "resume" if state else "start",
                    "epoch": start_epoch,
                    "global_step": global_step,
                    "world_size": world,
                    "device": str(device),
                }
            ]
        )
    coco_gt = _load_gt(job) if rank == 0 and job.train.eval_every else None
    label_names = {int(k): v for k, v in info.get("category_names", {}).items()}
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if job.train.eval_every else None
    epochs = job.train.epochs

    epoch_clock = config.get("epoch_clock")
    for epoch in range(start_epoch, epochs):
        _seed_everything(job.train.seed + 1000 * epoch + rank)
        if epoch_clock is not None:  # before asking for the epoch's data, on every rank
            ray.get(epoch_clock.set.remote(epoch))
        drawn_epochs: set[int] = set()
        epoch_start = time.time()
        base_step = global_step

        def on_step(record: dict[str, Any], epoch=epoch, base_step=base_step) -> None:
            gstep = base_step + record["step"]
            remaining = (epochs - epoch) * epoch_steps - record["step"]
            if rank == 0:
                progress.on_step(record, epoch, gstep, remaining)
            _maybe_inject_fault(job, rank, gstep)

        stats = train_one_epoch(
            model,
            criterion,
            _batches(train_shard, job, device, epoch, train=True, drawn_epochs=drawn_epochs),
            optimizer,
            scheduler,
            device=device,
            amp_dtype=amp_dtype,
            scaler=scaler,
            grad_accum_steps=job.train.grad_accum_steps,
            clip_max_norm=job.train.clip_max_norm,
            max_steps=None,  # the dataset ends the epoch (prepare_data limits it when capped)
            on_step=on_step,
        )
        global_step += stats["steps"]
        progress.flush()
        images = stats["images"]
        epoch_metrics = _mean_across_workers(stats, device)
        train_time = time.time() - epoch_start
        epoch_metrics.update(
            epoch=epoch,
            global_step=global_step,
            images_per_s=images * world / max(train_time, 1e-9),
            lr=optimizer.param_groups[0]["lr"],
            max_mem_mb=peak_memory_mb(device),
        )
        epoch_metrics.pop("images", None)

        ap: dict[str, float] | None = None
        due = job.train.eval_every and ((epoch + 1) % job.train.eval_every == 0 or epoch + 1 == epochs)
        if due:
            eval_start = time.time()
            ap, vis = distributed_evaluate(
                model,
                postprocessor,
                _batches(val_shard, job, device, epoch, train=False),
                job=job,
                device=device,
                amp_dtype=amp_dtype,
                coco_gt=coco_gt,
                rank=rank,
                label_names=label_names,
                num_val=info.get("num_val"),
            )
            if rank == 0:
                ap["eval_time_s"] = time.time() - eval_start
                progress.send([{"kind": "eval", "time": time.time(), "epoch": epoch, "global_step": global_step, **ap}])
                if vis and sink is not None:
                    sink.log_vis.remote(vis)
        if ap is not None:
            epoch_metrics.update({k: ap[k] for k in AP_KEYS})
        epoch_metrics["epoch_time_s"] = time.time() - epoch_start
        # Checkpoints rank by AP; epochs without evaluation rank below any evaluated one (NaN sorts
        # lowest), and without any evaluation they rank by the negated loss.
        if job.train.eval_every:
            epoch_metrics[SCORE_KEY] = ap["AP"] if ap is not None else float("nan")
        else:
            epoch_metrics[SCORE_KEY] = -epoch_metrics["loss"]
        history.append(epoch_metrics)
        if rank == 0:
            # data_epochs: the epochs rank 0's augmentation was drawn for (the loop's own, or a bug).
            progress.send(
                [{"kind": "epoch", "time": time.time(), **epoch_metrics, "data_epochs": sorted(drawn_epochs)}]
            )
        _report(job, model, detr_cfg, optimizer, scheduler, scaler, epoch, global_step, history, info, rank)


def _report(job, model, detr_cfg, optimizer, scheduler, scaler, epoch, global_step, history, info, rank) -> None:
    """Every rank reports the epoch; rank 0 attaches the checkpoint, written whole before Ray sees it."""
    metrics = dict(history[-1])
    if rank != 0:
        ray.train.report(metrics)
        return
    d = tempfile.mkdtemp(prefix=f"ddetr-epoch{epoch}-")
    try:
        save_checkpoint(
            os.path.join(d, CHECKPOINT_FILE),
            model,
            detr_cfg,
            meta={
                "job_config": job.model_dump_json(),
                "dataset": {k: v for k, v in info.items() if k != "sizes"},
                "epoch": epoch,
            },
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else {},
            epoch=epoch,
            global_step=global_step,
            history=history,
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}",
        )
        # report() returns once the files are uploaded, but the controller registers the checkpoint
        # a little later; a worker dying in between would restart the run from the one before.
        # Waiting here (the other ranks wait for rank 0 at their next gradient all-reduce) closes that gap.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=600
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Evaluation only (pipelines/evaluate.py): load a checkpoint, infer on the val shard, report AP.

    Args:
        config: {"job": JobConfig JSON dict (model section = the checkpoint's), "dataset_info",
            "weights": ObjectRef of the state_dict, "sink": MetricsSink (receives the AP)}.
    """
    job = JobConfig.model_validate(config["job"])
    _quiet_report_log(job.train.ray_log_level)
    info = config["dataset_info"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    amp_dtype = resolve_amp_dtype(job.train.amp, device)
    model, _, _ = build_model(job.detr_config(), load_backbone_weights=False)
    load_model_weights(model, ray.get(config["weights"]))
    # Inference needs no gradient sync: no DDP wrapper, just the device.
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)
    postprocessor = PostProcess(num_select=100, label_map=info.get("label_to_category_id")).to(device)
    coco_gt = _load_gt(job) if rank == 0 else None
    start = time.time()
    ap, vis = distributed_evaluate(
        model,
        postprocessor,
        _batches(ray.train.get_dataset_shard("val"), job, device, -1, train=False),
        job=job,
        device=device,
        amp_dtype=amp_dtype,
        coco_gt=coco_gt,
        rank=rank,
        label_names={int(k): v for k, v in info.get("category_names", {}).items()},
        num_val=info.get("num_val"),
    )
    if rank == 0:
        ap["eval_time_s"] = time.time() - start
        # Result.metrics only keeps reports that carry a checkpoint: the AP goes through the sink.
        sink = config["sink"]
        sink.log_vis.remote(vis)
        ray.get(sink.log.remote([{"kind": "eval", "time": time.time(), **ap}]))
    ray.train.report(ap if rank == 0 else {})
