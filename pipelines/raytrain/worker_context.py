"""A Ray Train worker's place in the run: rank, device, seeds, its dataset shard as batches, cross-worker means."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipelines.data.batching import iter_batches
from pipelines.engine import resolve_amp_dtype
from pipelines.job_config import JobConfig


@dataclass(frozen=True)
class WorkerContext:
    """This worker's rank, world size, device and autocast dtype."""

    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @classmethod
    def current(cls, job: JobConfig) -> WorkerContext:
        """The context inside a Ray Train worker; also quiets Ray Train's per-report log line."""
        _quiet_report_log(job.train.ray_log_level)
        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), device, resolve_amp_dtype(job.train.amp, device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seeds this rank's RNGs for the optimizer step after ``step`` steps of ``epoch``: what a step draws
    (dropout) is a function of where it is, so a group restarted in the middle of an epoch draws the same."""
    seed_everything(int(np.random.default_rng([seed, epoch, step, rank]).integers(2**31)))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_across_workers(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Epoch averages of every rank, averaged (the loss keys are the same on every rank)."""
    if not distributed():
        return dict(stats)
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def shard_batches(
    split: str,
    job: JobConfig,
    device: torch.device,
    epoch: int,
    *,
    drawn_epochs: set[int] | None = None,
    skip_batches: int = 0,
) -> Iterator[dict[str, Any]]:
    """Model batches of this worker's shard of ``split``; train drops the last partial batch (equal steps).

    ``skip_batches``: the first batches of the shard are passed over (a restart in the middle of an epoch).
    """
    data, train = job.data, split == "train"
    batch_size = data.batch_size_per_worker if train else (job.train.eval_batch_size or data.batch_size_per_worker)
    return iter_batches(
        ray.train.get_dataset_shard(split),
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
        skip_batches=skip_batches,
    )


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
