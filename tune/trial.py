"""The trial driver: one trial's training config, run as a full Ray Train job, its epochs reported to Tune.

The driver itself holds almost no resources (``TRIAL_DRIVER_RESOURCES``); the TorchTrainer it fits
asks for the trial's workers (and GPUs) through its own placement group, which Tune cannot see.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.config import JobConfig, validate_job_config
from tune.space import apply_params

# Tune refuses 0; the driver only parses annotations and waits on the trainer.
TRIAL_DRIVER_RESOURCES = {"cpu": 0.01}
# The scheduler's clock, in every epoch's report: epochs this trial has trained, which (unlike Tune's
# training_iteration) continues where it was when an interrupted trial resumes from its Train checkpoint.
EPOCHS_DONE = "epochs_done"


def trial_job(base: dict[str, Any], params: dict[str, Any], trials_uri: str, trial_id: str) -> JobConfig:
    """The validated training config of one trial.

    Its Train run is ``<trials_uri>/<trial_id>``: named by the trial id alone, so a restored trial
    (same id) finds its own checkpoints and continues from the last one.
    """
    data = apply_params(base, params)
    data["train"].update(storage_path=trials_uri, name=trial_id)
    return validate_job_config(data)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], trials_uri: str) -> None:
    """The Tune function of every trial.

    Args:
        config: the trial's sampled parameters, by dotted training-config name.
        base: the sweep's resolved base training config (JSON dict).
        trials_uri: where the trials' Train runs live (``<sweep dir>/trials``).
    """
    import ray.tune

    from pipelines.raytrain.errors import describe_failure
    from pipelines.raytrain.training import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    job = trial_job(base, config, trials_uri, trial_id)
    # Built here, inside the trial: the callback talks to this trial's Tune session. The run's own
    # lines go to its run directory (metrics.jsonl); the sweep's driver prints the sweep's progress.
    outcome = run_training(job, callbacks=[TuneReportCallback()], quiet=True)
    if outcome.error is not None:
        raise RuntimeError(f"trial {trial_id}: training failed: {describe_failure(outcome.error)}")
