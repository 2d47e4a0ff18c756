"""A run directory given as a checkpoint: its best checkpoint by score, else its latest, read from the
snapshot Ray Train writes (tests/run_dirs.py); a checkpoint folder or file as it is."""

from __future__ import annotations

import pytest
from run_dirs import write_run

from pipelines.raytrain.run_dir import SNAPSHOT_FILE
from pipelines.raytrain.state import CHECKPOINT_FILE, UNSCORED, fetch_checkpoint_file, resolve_checkpoint


def test_a_run_directory_stands_for_its_best_checkpoint(tmp_path):
    # The best (0.42) is neither the first kept nor the latest (a mid-epoch checkpoint, unscored).
    run = write_run(
        tmp_path / "run",
        [("checkpoint_epoch0000", 0.31), ("checkpoint_epoch0001", 0.42), ("checkpoint_step00000090", UNSCORED)],
        latest="checkpoint_step00000090",
    )
    assert resolve_checkpoint(str(run)) == str(run / "checkpoint_epoch0001")
    # A checkpoint folder, or a file, is what it names.
    assert resolve_checkpoint(str(run / "checkpoint_epoch0000")) == str(run / "checkpoint_epoch0000")
    file = str(run / "checkpoint_epoch0000" / CHECKPOINT_FILE)
    assert resolve_checkpoint(file) == file
    # As a file:// URI, the best checkpoint's file is found in its folder.
    best = resolve_checkpoint(f"file://{run}")
    assert best == f"file://{run}/checkpoint_epoch0001"
    assert fetch_checkpoint_file(best, str(tmp_path)) == str(run / "checkpoint_epoch0001" / CHECKPOINT_FILE)


def test_without_scores_the_latest_and_ties_go_to_the_latest(tmp_path):
    steps = write_run(
        tmp_path / "steps",
        [("checkpoint_step00000010", UNSCORED), ("checkpoint_step00000020", UNSCORED)],
        latest="checkpoint_step00000020",
    )
    assert resolve_checkpoint(str(steps)) == str(steps / "checkpoint_step00000020")
    tied = write_run(
        tmp_path / "tied",
        [("checkpoint_epoch0003", 0.5), ("checkpoint_epoch0001", 0.5), ("checkpoint_epoch0000", 0.1)],
        latest="checkpoint_epoch0003",
    )
    assert resolve_checkpoint(str(tied)) == str(tied / "checkpoint_epoch0003")


def test_a_run_without_a_checkpoint_is_named(tmp_path):
    run = write_run(tmp_path / "run", [], latest=None)
    with pytest.raises(ValueError, match=rf"{run}: a run directory with no checkpoint yet"):
        resolve_checkpoint(str(run))
    (run / SNAPSHOT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable Ray Train checkpoint snapshot"):
        resolve_checkpoint(str(run))


def test_the_runs_best_checkpoint_tag_names_the_checkpoint_evaluate_takes(tmp_path):
    """MLflow's best_checkpoint tag and `evaluate.py --checkpoint RUN` agree, ties included (AP 0.0 twice)."""
    from pipelines.raytrain.run_dir import RunDir
    from pipelines.raytrain.training import best_checkpoint_uri

    write_run(tmp_path / "tied", [("checkpoint_epoch0000", 0.0), ("checkpoint_epoch0001", 0.0)], "checkpoint_epoch0001")
    assert best_checkpoint_uri(RunDir(str(tmp_path), "tied")) == str(tmp_path / "tied" / "checkpoint_epoch0001")
    write_run(tmp_path / "empty", [], latest=None)
    assert best_checkpoint_uri(RunDir(str(tmp_path), "empty")) is None
