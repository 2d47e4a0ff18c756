"""Training and evaluation loops as plain functions: optimizer, lr schedules, one epoch, inference to COCO records.

Nothing here imports Ray: the Ray Train worker (pipelines/raytrain/worker.py) calls these with its dataset
shard, and the tests call them with lists of batches.

A batch is ``{"images": (N, 3, H, W) float, "mask": (N, H, W) bool (True = padding), "targets": N dicts
with "boxes" (K_i, 4) normalized cxcywh, "labels" (K_i,), "image_id", "orig_size" (2,) h, w and
"size" (2,) h, w of the resized image}``.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from core.box_ops import box_cxcywh_to_xyxy
from core.evaluation import detections_to_coco

if TYPE_CHECKING:
    from pipelines.job_config import TrainConfig

# Parameter-name fragments of the authors' groups (their main.py: lr_backbone_names, lr_linear_proj_names).
BACKBONE_NAMES = ("backbone.0",)
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


def _group_lrs(train_cfg: TrainConfig) -> dict[str, float]:
    return {
        "main": train_cfg.lr,
        "backbone": train_cfg.lr_backbone,
        "linear_proj": train_cfg.lr * train_cfg.lr_linear_proj_mult,
    }


def _group_of(name: str) -> str:
    if _matches(name, BACKBONE_NAMES):
        return "backbone"
    if _matches(name, LINEAR_PROJ_NAMES):
        return "linear_proj"
    return "main"


def freeze_zero_lr_params(model: nn.Module, train_cfg: TrainConfig) -> int:
    """Turn off ``requires_grad`` for the parameters whose group lr is 0 (lr_backbone=0, as the authors do).

    Call it before wrapping the model in DDP: a parameter that merely sits outside the optimizer would
    still get gradients that DDP all-reduces, that no ``zero_grad`` clears and that gradient clipping
    counts in its norm.

    Returns:
        How many parameter tensors were frozen.
    """
    lrs = _group_lrs(train_cfg)
    frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad and lrs[_group_of(name)] <= 0:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def build_param_groups(model: nn.Module, train_cfg: TrainConfig, lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The authors' three parameter groups, trainable parameters only.

    Args:
        model: the detector, possibly wrapped by DDP (the names then start with ``module.``).
        train_cfg: TrainConfig (lr, lr_backbone, lr_linear_proj_mult).
        lr_scale: multiplies every group's lr (live_lr_scale of an elastic run).

    Returns:
        [{"name": "main", "params", "lr"}, {"name": "backbone", ...}, {"name": "linear_proj", ...}],
        groups with no parameters left out. Weight decay comes from the optimizer's default.
    """
    lrs = _group_lrs(train_cfg)
    params: dict[str, list[nn.Parameter]] = {name: [] for name in lrs}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[_group_of(name)].append(p)
    # A group at lr 0 is frozen (freeze_zero_lr_params): leave it out rather than carry dead AdamW state.
    return [{"name": g, "params": params[g], "lr": lrs[g] * lr_scale} for g in lrs if params[g] and lrs[g] > 0]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over build_param_groups with the config's weight decay; ``lr_scale`` as there."""
    return torch.optim.AdamW(
        build_param_groups(model, train_cfg, lr_scale), lr=train_cfg.lr * lr_scale, weight_decay=train_cfg.weight_decay
    )


def live_lr_scale(world_size: int, train_cfg: TrainConfig) -> float:
    """The lr multiplier of a worker group of ``world_size`` workers.

    The per-worker batch stays as configured, so the total batch follows the live worker count, and the
    lr follows the total batch linearly (the linear scaling rule): ``train.lr`` is the lr of
    ``train.max_workers`` workers, and an elastic run shrunk to half of them trains at half of it.
    """
    return world_size / train_cfg.max_workers


def steps_per_epoch(num_rows: int, world_size: int, batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps each worker takes in an epoch of ``num_rows`` training rows split equally over
    ``world_size`` workers, incomplete batches dropped (DDP needs the same step count on every rank)."""
    batches = (num_rows // world_size) // batch_size
    return math.ceil(batches / grad_accum_steps)


def lr_factor(progress_epochs: float, train_cfg: TrainConfig) -> float:
    """Multiplier of every group's base lr after ``progress_epochs`` (fractional) epochs.

    step: 1, then lr_drop_factor from epoch lr_drop on (the paper: x0.1 at 40 of 50).
    cosine: half a cosine from 1 to min_lr_ratio over the run.
    warmup_cosine: linear from ~0 to 1 over warmup_epochs, then the cosine over the rest.
    """
    schedule, epochs = train_cfg.lr_schedule, train_cfg.epochs
    if schedule == "step":
        return train_cfg.lr_drop_factor if progress_epochs >= train_cfg.lr_drop else 1.0
    warmup = train_cfg.warmup_epochs if schedule == "warmup_cosine" else 0.0
    if progress_epochs < warmup:
        return max(progress_epochs / warmup, 1e-3)
    t = min(max((progress_epochs - warmup) / max(epochs - warmup, 1e-8), 0.0), 1.0)
    lo = train_cfg.min_lr_ratio
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step LambdaLR following lr_factor.

    Stepping per optimizer step (not per epoch) lets warmup last a fraction of an epoch; the step
    schedule still drops exactly at the start of epoch lr_drop.

    Args:
        optimizer: from build_optimizer.
        train_cfg: TrainConfig.
        steps_per_epoch: optimizer steps per epoch on each worker (after gradient accumulation).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step / steps_per_epoch, train_cfg))


def realign_lr_scheduler(
    scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer_step: int, base_lrs: list[float] | None = None
) -> bool:
    """Puts a restored per-step scheduler at ``optimizer_step`` of this run and sets the groups' lr to match.

    A resume with another worker count, batch size or accumulation has another number of optimizer
    steps per epoch, so the restored step count would put the lr drop or the cosine elsewhere; an
    elastic run resumed on another number of workers also has another lr (``base_lrs``, this run's).

    Returns:
        True if the scheduler had to move or change its base lrs.
    """
    rebase = base_lrs is not None and [float(b) for b in base_lrs] != [float(b) for b in scheduler.base_lrs]
    if scheduler.last_epoch == optimizer_step and not rebase:
        return False
    if rebase:
        scheduler.base_lrs = list(base_lrs)
        for group, base in zip(scheduler.optimizer.param_groups, base_lrs):
            group["initial_lr"] = base
    scheduler.last_epoch = optimizer_step
    lrs = [base * fn(optimizer_step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    return True


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of TrainConfig.amp on ``device``: None means full float32.

    auto is bfloat16 on CUDA and off on the CPU (CPU bf16 autocast is slower than float32 on most CPUs).
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' or 'off' on the CPU")
        return torch.float16
    raise ValueError(f"amp must be one of auto, bf16, fp16, off, got {amp!r}")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def targets_to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Per-image target dicts with their tensors moved to ``device``."""
    return [
        {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets
    ]


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    batches: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum_steps: int = 1,
    clip_max_norm: float = 0.0,
    max_steps: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` with autocast, gradient accumulation and clipping.

    Args:
        model: the detector, plain or DDP-wrapped (then gradients of all but the last micro-batch of
            each step are kept local with ``no_sync``).
        criterion: SetCriterion; ``criterion.total_loss`` gives the training loss.
        batches: iterable of batches (see the module docstring).
        optimizer: the optimizer.
        scheduler: stepped after every optimizer step; None keeps the lr.
        device: where the model is.
        amp_dtype: autocast dtype (resolve_amp_dtype), None for float32.
        scaler: GradScaler for float16; None otherwise.
        grad_accum_steps: micro-batches per optimizer step; a shorter last group still steps.
        clip_max_norm: gradient clipping max norm, 0 = off.
        max_steps: stop after this many optimizer steps.
        on_step: called after every optimizer step with a dict: "step" (1-based, this epoch), "loss"
            (weighted total), every unweighted term of the criterion ("loss_ce", "loss_bbox_0", ...,
            "class_error"), "lr" (main group) and "lr_<group>", "grad_norm" (before clipping, None
            without clipping), "step_images" (this worker's images in the step), "step_time_s".

    Returns:
        Averages over the epoch's optimizer steps of "loss" and every criterion term, plus "steps",
        "images" (this worker's) and "epoch_time_s".

    Raises:
        FloatingPointError: the loss became NaN or infinite (the message lists the terms).
    """
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    steps = images_total = 0
    epoch_start = step_start = time.perf_counter()
    micro = 0
    step_images = 0
    step_terms: dict[str, float] = {}
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    it = iter(batches)
    batch = next(it, None)
    while batch is not None:
        next_batch = next(it, None)  # look ahead so the last micro-batch of the epoch syncs gradients
        micro += 1
        sync = micro == grad_accum_steps or next_batch is None
        images = batch["images"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        targets = targets_to_device(batch["targets"], device)
        ctx = model.no_sync() if (is_ddp and not sync) else contextlib.nullcontext()
        with ctx:
            with _autocast(device, amp_dtype):
                outputs = model(images, mask)
            loss_dict = criterion(outputs, targets)
            loss = criterion.total_loss(loss_dict)
            scaled = loss / grad_accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        # One device sync per micro-batch, for every term at once, after backward is queued. A
        # non-finite loss stops here, before the optimizer step could spread it into the weights.
        values = torch.stack([v.detach().float() for v in loss_dict.values()] + [loss.detach().float()]).tolist()
        if not math.isfinite(values[-1]):
            terms = dict(zip(loss_dict, values))
            raise FloatingPointError(f"loss is {values[-1]} at step {steps + 1}; terms: {terms}")
        for k, v in zip([*loss_dict, "loss"], values):
            step_terms[k] = step_terms.get(k, 0.0) + v / grad_accum_steps
        step_images += images.shape[0]

        if sync:
            if micro < grad_accum_steps:
                # Short last group: rescale so its gradient is a mean over the micro-batches it has.
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(grad_accum_steps / micro)
                step_terms = {k: v * grad_accum_steps / micro for k, v in step_terms.items()}
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if clip_max_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
            if scheduler is not None:
                scheduler.step()
            steps += 1
            images_total += step_images
            now = time.perf_counter()
            record = {
                "step": steps,
                **step_terms,
                "lr": lrs.get("lr_main", optimizer.param_groups[0]["lr"]),
                **lrs,
                "grad_norm": grad_norm,
                "step_images": step_images,
                "step_time_s": now - step_start,
            }
            for k, v in step_terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if on_step is not None:
                on_step(record)
            step_start = now
            micro = step_images = 0
            step_terms = {}
            if max_steps is not None and steps >= max_steps:
                break
        batch = next_batch
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out.update(steps=steps, images=images_total, epoch_time_s=time.perf_counter() - epoch_start)
    return out


def denormalize_image(image: Tensor, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalized padded image -> (h, w, 3) uint8 of its valid ``size`` (h, w) region."""
    h, w = int(size[0]), int(size[1])
    x = image[:, :h, :w].float().cpu()
    x = x * torch.as_tensor(std).view(3, 1, 1) + torch.as_tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_vis: int = 0,
    vis_score_threshold: float = 0.3,
    pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
    pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
    label_names: dict[int, str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict], list[int], list[dict[str, Any]]]:
    """Inference over ``batches`` into COCO result records.

    Args:
        model: the detector, plain or DDP (unwrapped here: no collectives, so shards may differ in size).
        postprocessor: PostProcess (with the dataset's label_map, so labels come out as category ids).
        batches: iterable of batches (see the module docstring).
        device: where the model is.
        amp_dtype: autocast dtype or None.
        num_vis: keep this many images (denormalized) with predicted and true boxes for drawing.
        vis_score_threshold: predicted boxes kept for drawing score above this.
        pixel_mean, pixel_std: the data normalization, to undo it for drawing.
        label_names: category id -> name for drawing; ids are drawn without it.
        on_batch: called after each batch with the number of images done so far (progress).

    Returns:
        (records, image_ids, vis): COCO result dicts (image_id, category_id, bbox xywh in original
        pixels, score), the image ids seen, and up to num_vis dicts {"image_id", "image" (h, w, 3)
        uint8, "pred_boxes" (k, 4) xyxy pixels of the resized image, "pred_scores", "pred_labels",
        "true_boxes", "true_labels", "label_names", "score_threshold"}.
    """
    # The bare module: DDP's forward would sync buffers with the other workers, whose val shards
    # may hold a different number of batches.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    records: list[dict] = []
    image_ids: list[int] = []
    vis: list[dict[str, Any]] = []
    try:
        for batch in batches:
            images = batch["images"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            targets = batch["targets"]
            with _autocast(device, amp_dtype):
                outputs = model(images, mask)
            outputs = {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()}
            orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
            results = postprocessor(outputs, orig_sizes)
            for t, r in zip(targets, results):
                image_id = int(t["image_id"])
                image_ids.append(image_id)
                records.extend(detections_to_coco(image_id, r))
            if len(vis) < num_vis:
                sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device)
                drawn = postprocessor.threshold(outputs, sizes, score_threshold=vis_score_threshold, max_detections=50)
                for i, (t, r) in enumerate(zip(targets, drawn)):
                    if len(vis) >= num_vis:
                        break
                    h, w = (int(s) for s in t["size"])
                    true_xyxy = box_cxcywh_to_xyxy(torch.as_tensor(t["boxes"]).float().cpu().reshape(-1, 4))
                    true_xyxy = true_xyxy * torch.tensor([w, h, w, h], dtype=torch.float32)
                    true_labels = torch.as_tensor(t["labels"]).cpu()
                    if getattr(postprocessor, "label_map", None) is not None and true_labels.numel():
                        true_labels = postprocessor.label_map.cpu()[true_labels]
                    vis.append(
                        {
                            "image_id": int(t["image_id"]),
                            "image": denormalize_image(images[i], (h, w), pixel_mean, pixel_std),
                            "pred_boxes": r["boxes"].cpu().numpy(),
                            "pred_scores": r["scores"].cpu().numpy(),
                            "pred_labels": r["labels"].cpu().numpy(),
                            "true_boxes": true_xyxy.numpy(),
                            "true_labels": true_labels.numpy(),
                            "label_names": dict(label_names or {}),
                            "score_threshold": vis_score_threshold,
                        }
                    )
            if on_batch is not None:
                on_batch(len(image_ids))
    finally:
        model.train(was_training)
    return records, image_ids, vis
