"""A run directory as pipelines/train.py leaves one, for the tests that read one back: checkpoint folders
and Ray Train's snapshot of them, made by Ray's own model of that file."""

from __future__ import annotations

from pathlib import Path

from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
    _CheckpointManagerState,
    _TrainingResultState,
)

from pipelines.raytrain.run_dir import SNAPSHOT_FILE
from pipelines.raytrain.state import CHECKPOINT_FILE, SCORE_KEY


def write_run(run: Path, kept: list[tuple[str, float]], latest: str | None) -> Path:
    """A run directory holding the ``kept`` (folder, score) checkpoints and Ray Train's snapshot of them."""
    results = []
    for name, score in kept:
        (run / name).mkdir(parents=True)
        (run / name / CHECKPOINT_FILE).write_bytes(b"weights")
        results.append(_TrainingResultState(checkpoint_dir_name=name, metrics={SCORE_KEY: score, "epoch": 0}))
    latest_result = next((r for r in results if r.checkpoint_dir_name == latest), None)
    state = _CheckpointManagerState(
        checkpoint_results=results,
        checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=latest_result,
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=len(results),
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    run.mkdir(parents=True, exist_ok=True)
    (run / SNAPSHOT_FILE).write_text(state.model_dump_json())
    return run
