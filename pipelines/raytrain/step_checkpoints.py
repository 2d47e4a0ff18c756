"""Mid-epoch checkpoints: when a worker group writes one (every N steps, on a preemption notice), and where
a restarted group picks the epoch up (the step after the checkpoint, the data order unchanged).

Every rank takes the same decision at the same step: ``ray.train.report`` is a barrier. The step count
decides, never a clock read on one rank; the one measured quantity (the step time behind the default
cadence and the preemption checks) is rank 0's, broadcast once.
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

# How often the workers ask Ray for a preemption notice. The question is a barrier through Ray Train's
# synchronization actor (12 ms on the loaded 2-core CI machine): every step would cost fast steps a few
# percent. Notices come 15 s (GKE spot) to 120 s (EC2) ahead; 5 s leaves most of that for the checkpoint.
PREEMPTION_CHECK_EVERY_S = 5.0

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
        every_steps: ``train.checkpoint_every_steps`` (0: epoch ends only, no preemption checkpoint
            either; None: measured, see DEFAULT_CHECKPOINT_EVERY_S; until measured, after the
            reporter's warm-up, none is due but the preemption one).
        rank: this worker's world rank (rank 0's step time is the one that counts).

    Preemption notices are asked for at every step until the step time is measured, then every
    PREEMPTION_CHECK_EVERY_S worth of steps.
    """

    def __init__(self, every_steps: int | None, rank: int) -> None:
        self.configured = every_steps
        self.every = every_steps
        self.rank = rank
        self.steps_seen = 0
        self.step_times: list[float] = []
        self.check_every = 1
        self.measured = False
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
        if not self.measured:
            self._measure(step_time_s)
        # Ray 2.60 sets the preemption info once a node of this group is drained with the preemption
        # reason (cluster/spot_watch.py on the launcher VMs, Ray itself on SIGTERM under KubeRay). A barrier:
        # every rank asks at the same steps.
        ask = self.configured != 0 and self.steps_seen % self.check_every == 0
        notice = ray.train.get_preemption_info() if ask else None
        new_notice = notice is not None and not self.notice_taken
        self.notice_taken = self.notice_taken or new_notice
        if epoch_step >= epoch_steps:
            return None  # the epoch's own checkpoint comes next
        if new_notice:
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
        """After the warm-up, rank 0's median step time sets the cadences, the same on every rank."""
        if self.steps_seen <= ETA_WARMUP_STEPS:
            return
        self.step_times.append(step_time_s)
        if len(self.step_times) < ETA_MIN_STEPS:
            return
        step_time = ray.train.collective.broadcast_from_rank_zero(statistics.median(self.step_times))
        self.measured = True
        self.every = resolve_every_steps(self.configured, step_time)
        self.check_every = max(1, math.floor(PREEMPTION_CHECK_EVERY_S / max(step_time, 1e-6)))
        if self.rank == 0:
            log.info(
                "steps take %.3g s: a checkpoint every %s steps, a preemption check every %d",
                step_time,
                self.every or "epoch's",
                self.check_every,
            )
