"""Where a restarted worker group picks up an epoch, and how often a mid-epoch checkpoint is due (no Ray)."""

from __future__ import annotations

from pipelines.raytrain.metrics import format_record
from pipelines.raytrain.step_checkpoints import DEFAULT_CHECKPOINT_EVERY_S, resolve_every_steps, resume_step


def test_resume_step_is_the_checkpoints_step_on_the_same_group():
    # 2 workers x 2 images x 3 micro-batches a step: 12 images a step.
    for step in (0, 1, 7):
        assert resume_step(step * 12, world_size=2, batch_size=2, grad_accum_steps=3) == step


def test_resume_step_after_a_resize_skips_the_trained_images_in_whole_steps():
    # 5 steps of 4 workers x 2 images = 40 images trained; 2 workers take 4 images a step: step 10.
    assert resume_step(40, world_size=2, batch_size=2, grad_accum_steps=1) == 10
    # Grown to 6 workers (12 images a step): 3 whole steps (36 images), 4 images of the epoch seen again.
    assert resume_step(40, world_size=6, batch_size=2, grad_accum_steps=1) == 3


def test_default_cadence_is_about_ten_minutes_of_steps():
    assert resolve_every_steps(25, step_time_s=0.1) == 25
    assert resolve_every_steps(0, step_time_s=0.1) == 0  # epoch ends only
    assert resolve_every_steps(None, step_time_s=0.4) == int(DEFAULT_CHECKPOINT_EVERY_S / 0.4)
    assert resolve_every_steps(None, step_time_s=1e4) == 1  # never less than every step


def test_console_lines_of_a_mid_epoch_checkpoint_and_resume():
    checkpoint = {"kind": "event", "event": "checkpoint", "epoch": 1, "global_step": 6, "epoch_step": 2}
    assert format_record(checkpoint) == "checkpoint in epoch 2 after step 2"
    assert (
        format_record({**checkpoint, "reason": "preemption"})
        == "checkpoint in epoch 2 after step 2 (preemption notice)"
    )
    resume = {"kind": "event", "event": "resume", "epoch": 1, "global_step": 6, "epoch_step": 2}
    assert format_record(resume) == "resuming in epoch 2 after step 2 (global step 6)"
    assert format_record({**resume, "epoch_step": 0, "global_step": 4}).startswith("resuming from the checkpoint")
