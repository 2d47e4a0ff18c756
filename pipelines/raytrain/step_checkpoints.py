"""Mid-epoch checkpoints: when a worker group writes one (every N steps, on a preemption notice), and where
a restarted group picks the epoch up (the step after the checkpoint, the data order unchanged).

Every rank takes the same decision at the same step: ``ray.train.report`` is a barrier. The step count
decides, never a clock read on one rank; the one measured quantity (the step time behind the default
cadence) is rank 0's, broadcast once.
"""

from __future__ import annotations

import logging
import math
import statistics

import ray.train
import ray.train.collective

from pipelines.raytrain.metrics import ETA_MIN_STEPS, ETA_WARMUP_STEPS

log = logging.getLogger(__name__)

# The default cadence (train.checkpoint_every_steps=None): a checkpoint about this often. A reclaimed spot
# worker then costs its group at most ~10 minutes of steps; one more checkpoint.pt upload per 10 minutes
# (a few hundred MB for the R50 models, seconds to a bucket) is a small fraction of the time it saves.
DEFAULT_CHECKPOINT_EVERY_S = 600.0

# The key a mid-epoch report carries (its value: "every_steps" or "preemption"); an epoch's report has none.
STEP_CHECKPOINT_KEY = "step_checkpoint"


def resume_step(epoch_images: int, world_size: int, batch_size: int, grad_accum_steps: int) -> int:
    """The optimizer step of the epoch in progress that a restarted worker group continues after.

    Args:
        epoch_images: images of that epoch all workers had trained on at the checkpoint.
        world_size, batch_size, grad_accum_steps: of the restarted group.

    Returns:
        The same step as the checkpoint's when the group has its size: every worker then skips exactly
        the batches it had trained on, and its shard is the same (the split is deterministic with
        ``preserve_order``). After an elastic resize the shards differ; the group skips as many of the
        epoch's images as were trained, rounded down to its own whole steps.
    """
    return epoch_images // (world_size * batch_size * grad_accum_steps)


def resolve_every_steps(every_steps: int | None, step_time_s: float) -> int:
    """``train.checkpoint_every_steps``, or for None the steps of DEFAULT_CHECKPOINT_EVERY_S at ``step_time_s``."""
    if every_steps is not None:
        return every_steps
    return max(1, math.floor(DEFAULT_CHECKPOINT_EVERY_S / max(step_time_s, 1e-6)))


class StepCheckpoints:
    """Decides, after each optimizer step, whether the group writes a mid-epoch checkpoint now.

    Args:
        every_steps: ``train.checkpoint_every_steps`` (0: epoch ends only; None: measured, see
            DEFAULT_CHECKPOINT_EVERY_S; until measured, after the reporter's warm-up, none is due).
        rank: this worker's world rank (rank 0's step time is the one that counts).
    """

    def __init__(self, every_steps: int | None, rank: int) -> None:
        self.every = every_steps
        self.rank = rank
        self.steps_seen = 0
        self.step_times: list[float] = []
        self.notice_taken = False

    def due(self, global_step: int, epoch_step: int, epoch_steps: int, step_time_s: float) -> str | None:
        """Called by every rank after each optimizer step; the reason for a checkpoint now, or None.

        Args:
            global_step: optimizer steps of the run so far (the cadence counts these, so a restarted
                group keeps it).
            epoch_step, epoch_steps: steps done in this epoch and its length (its last step gets the
                epoch's checkpoint instead).
            step_time_s: this step's time on this worker.
        """
        self.steps_seen += 1
        if self.every is None:
            self._measure(step_time_s)
        # Ray 2.60 sets the preemption info once a node of this group is drained with the preemption
        # reason (cluster/spot_watch.py on the launcher VMs, Ray itself on SIGTERM under KubeRay). A barrier:
        # every rank asks at every step.
        notice = ray.train.get_preemption_info()
        if epoch_step >= epoch_steps:
            return None
        if notice is not None and not self.notice_taken:
            self.notice_taken = True
            log.warning(
                "preemption notice for nodes %s (ranks %s): checkpoint at global step %d",
                notice.preempted_node_ids,
                notice.preempted_ranks,
                global_step,
            )
            return "preemption"
        if self.every and global_step % self.every == 0:
            return "every_steps"
        return None

    def _measure(self, step_time_s: float) -> None:
        """After the warm-up, rank 0's median step time sets the cadence, the same on every rank."""
        if self.steps_seen <= ETA_WARMUP_STEPS:
            return
        self.step_times.append(step_time_s)
        if len(self.step_times) < ETA_MIN_STEPS:
            return
        mine = statistics.median(self.step_times)
        step_time = ray.train.collective.broadcast_from_rank_zero(mine)
        self.every = resolve_every_steps(None, step_time)
        if self.rank == 0:
            log.info("steps take %.3g s: a checkpoint every %d steps", step_time, self.every)
