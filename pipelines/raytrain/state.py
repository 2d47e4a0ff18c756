"""The training state that goes into a checkpoint, and writes and restores itself.

One file per checkpoint, ``checkpoint.pt``, in core's format (``core.read_checkpoint`` and
``pipelines/evaluate.py`` read it): the model weights and DetrConfig, plus the optimizer, scheduler,
scaler, the last finished epoch, the optimizer steps so far, the data epoch the next epoch draws, how far
into that epoch a mid-epoch checkpoint was written (steps and images), the per-epoch history, and the
whole JobConfig as JSON in ``meta``.

Each checkpoint is a folder of its own: ``checkpoint_epochNNNN`` after epoch NNNN (0-based),
``checkpoint_stepNNNNNNNN`` at global optimizer step NNNNNNNN in the middle of an epoch. A run directory
stands for its best checkpoint, else its latest (``resolve_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray.train
import torch
from torch import nn

from core.checkpoint import load_model_weights, read_checkpoint, save_checkpoint
from pipelines.job_config import JobConfig
from pipelines.raytrain.run_dir import SNAPSHOT_FILE
from pipelines.storage import fetch_file, file_type, has_scheme, is_remote, join_uri, local_path, read_bytes

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SCORE_KEY = "checkpoint_score"  # AP, or -loss in runs without evaluation: what keep_checkpoints ranks by
# The score of a checkpoint without one (an epoch not evaluated, a mid-epoch checkpoint): below any AP or
# -loss, and finite, because Ray's checkpoint snapshot (pydantic JSON) writes NaN and inf as null, which
# its restore then cannot rank. Among equal scores Ray keeps the later checkpoints.
UNSCORED = -1e30


def resolve_checkpoint(uri: str) -> str:
    """The checkpoint ``uri`` names: itself, or for a run directory its best checkpoint, else its latest.

    A run directory (``<storage_path>/<train.name>``, holding Ray Train's snapshot of the checkpoints it
    kept) stands for the kept checkpoint of the highest SCORE_KEY (AP, or -loss without evaluation); when
    none has a score (mid-epoch checkpoints only), the latest one. A file or a checkpoint folder is
    returned as it is.

    Raises:
        ValueError: a run directory without a checkpoint yet, or with an unreadable snapshot.
    """
    import pyarrow.fs as pafs

    if has_scheme(uri) and not is_remote(uri) and not uri.startswith("file://"):
        return uri  # http(s): a file
    if file_type(uri) != pafs.FileType.Directory or file_type(join_uri(uri, CHECKPOINT_FILE)) == pafs.FileType.File:
        return uri
    snapshot_uri = join_uri(uri, SNAPSHOT_FILE)
    if file_type(snapshot_uri) != pafs.FileType.File:
        return uri  # not a run directory: fetch_checkpoint_file names the missing checkpoint.pt
    try:
        snapshot = json.loads(read_bytes(snapshot_uri))
        kept = [
            (r["checkpoint_dir_name"], r["metrics"].get(SCORE_KEY, UNSCORED)) for r in snapshot["checkpoint_results"]
        ]
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{snapshot_uri.partition('?')[0]}: not a readable Ray Train checkpoint snapshot ({e})") from e
    scored = [(score, name) for name, score in kept if isinstance(score, (int, float)) and score > UNSCORED]
    if scored:
        best = max(score for score, _ in scored)
        ties = [name for score, name in scored if score == best]
        name = latest if latest in ties else ties[-1]
    elif latest is not None:
        name = latest
    else:
        raise ValueError(
            f"{uri.partition('?')[0]}: a run directory with no checkpoint yet ({SNAPSHOT_FILE} lists none)"
        )
    return join_uri(uri, name)


def fetch_checkpoint_file(uri: str, dest_dir: str) -> str:
    """A local file for a checkpoint given as a file or a run's checkpoint folder: path, http(s), s3://, gs://."""
    import pyarrow.fs as pafs

    if is_remote(uri):
        if file_type(uri) == pafs.FileType.Directory:
            uri = join_uri(uri, CHECKPOINT_FILE)
    elif not has_scheme(uri) or uri.startswith("file://"):
        if os.path.isdir(local_path(uri)):
            return os.path.join(local_path(uri), CHECKPOINT_FILE)
    return fetch_file(uri, dest_dir)


def checkpoint_scratch(name: str) -> str:
    """A new folder for one checkpoint's file, ``ddetr-<name>-<pid>-*`` in the temporary folder, once those
    of processes gone are removed: a worker killed while it reports (Ray's memory monitor, a restart
    after a lost node) cannot clean up, and each left folder holds a whole checkpoint."""
    root = tempfile.gettempdir()
    for entry in os.scandir(root):
        parts = entry.name.split("-")
        if len(parts) == 4 and parts[0] == "ddetr" and parts[1].startswith("checkpoint_") and parts[2].isdigit():
            if not _alive(int(parts[2])):
                shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"ddetr-{name}-{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class TrainState:
    """Everything a resumed worker needs to continue exactly where a checkpoint left off.

    Attributes:
        model: the detector (a DDP wrapper is unwrapped on save).
        optimizer, scheduler: AdamW and the per-step LambdaLR.
        scaler: the float16 GradScaler, or None.
        epoch: the last finished epoch (-1 before the first).
        global_step: optimizer steps done across epochs.
        data_epoch: the epoch the next epoch's data order and augmentation are drawn for.
        epoch_step: optimizer steps done in the epoch in progress (0 at an epoch's end).
        epoch_images: images of the epoch in progress trained on, all workers together (0 at an end).
        history: one metrics dict per finished epoch (what each ``ray.train.report`` carried).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    epoch: int = -1
    global_step: int = 0
    data_epoch: int = 0
    epoch_step: int = 0
    epoch_images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start_epoch(self) -> int:
        return self.epoch + 1

    def restore(self, path: str) -> None:
        """Loads a checkpoint file written by ``save`` into this state, in place."""
        ckpt = read_checkpoint(path)
        load_model_weights(self.model, ckpt.model)
        s = ckpt.extra
        # The moments and step counts are the checkpoint's, the weight decay this run's config (a resume's
        # --set train.weight_decay=... holds); the lr is the scheduler's (engine.realign_lr_scheduler).
        decay = [group["weight_decay"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(s["optimizer"])
        for group, wd in zip(self.optimizer.param_groups, decay):
            group["weight_decay"] = wd
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scaler is not None and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.epoch = int(s["epoch"])
        self.global_step = int(s["global_step"])
        # Checkpoints from before data_epoch was saved drew each epoch's data for the epoch itself.
        self.data_epoch = int(s.get("data_epoch", self.epoch + 1))
        self.epoch_step = int(s.get("epoch_step", 0))
        self.epoch_images = int(s.get("epoch_images", 0))
        self.history = list(s.get("history", []))

    def save(self, path: str, job: JobConfig, dataset_facts: dict[str, Any]) -> None:
        """Writes the state to ``path`` (core's checkpoint format with the training entries added)."""
        save_checkpoint(
            path,
            self.model,
            job.detr_config(),
            meta={"job_config": job.model_dump_json(), "dataset": dataset_facts, "epoch": self.epoch},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else {},
            epoch=self.epoch,
            global_step=self.global_step,
            data_epoch=self.data_epoch,
            epoch_step=self.epoch_step,
            epoch_images=self.epoch_images,
            history=self.history,
        )

    def restore_from_ray(self, checkpoint: ray.train.Checkpoint) -> None:
        """Restores from the latest checkpoint Ray Train hands a (re)started worker."""
        with checkpoint.as_directory() as d:
            self.restore(os.path.join(d, CHECKPOINT_FILE))

    @property
    def checkpoint_dir_name(self) -> str:
        """``checkpoint_epochNNNN`` at an epoch's end, ``checkpoint_stepNNNNNNNN`` in the middle of one."""
        return f"checkpoint_step{self.global_step:08d}" if self.epoch_step else f"checkpoint_epoch{self.epoch:04d}"

    def report(self, metrics: dict[str, Any], job: JobConfig, dataset_facts: dict[str, Any], rank: int) -> None:
        """Every rank reports (a barrier); rank 0 attaches the checkpoint of this state, written whole first."""
        if rank != 0:
            ray.train.report(metrics)
            return
        name = self.checkpoint_dir_name
        d = checkpoint_scratch(name)
        try:
            self.save(os.path.join(d, CHECKPOINT_FILE), job, dataset_facts)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
            # report() returns once the files are uploaded, but the controller registers the checkpoint
            # a little later; a worker dying in between would restart the run from the one before.
            # Waiting here (the other ranks wait for rank 0 at their next gradient all-reduce) closes that gap.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=600
            )
        finally:
            shutil.rmtree(d, ignore_errors=True)
