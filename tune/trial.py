"""The trial driver: one trial's training config, run as a full Ray Train job, its epochs reported to Tune.

The driver itself holds almost no resources (``trial_driver_resources``); the TorchTrainer it fits
asks for the trial's workers (and GPUs) through its own placement group, which Tune cannot see.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import NODE_ID_LABEL_KEY

from pipelines.job_config import JobConfig, validate_job_config
from pipelines.raytrain.step_checkpoints import STEP_CHECKPOINT_KEY
from pipelines.raytrain.tracking import MlflowTarget
from tune.space import apply_params

log = logging.getLogger(__name__)

# Tune refuses 0; the driver only parses annotations and waits on the trainer.
TRIAL_DRIVER_CPUS = 0.01
# The scheduler's clock, in every epoch's report: epochs this trial has trained, which (unlike Tune's
# training_iteration) continues where it was when an interrupted trial resumes from its Train checkpoint.
EPOCHS_DONE = "epochs_done"


class EpochReportCallback(TuneReportCallback):
    """Tune's callback for the trial's Train run, passing on the epochs' reports only.

    A mid-epoch checkpoint's report (``STEP_CHECKPOINT_KEY``) holds no AP: Tune would refuse it (its metric
    missing), and it is no point on the trial's curve. The Train run still resumes from it.
    """

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and STEP_CHECKPOINT_KEY in metrics[0]:
            return
        super().after_report(run_context, metrics, checkpoint)


def trial_driver_resources() -> PlacementGroupFactory:
    """A trial driver's resources: 0.01 CPU on the sweep driver's node, the head on a cluster.

    Anywhere else it could land on a spot worker, and a reclamation would take the trial's driver (and
    with it the trial) along with that worker's share of the training. A driver node without CPUs
    (a head started with ``--num-cpus=0``) could never hold it: the drivers then go wherever Ray puts them.
    """
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node and n["Alive"]), 0.0)
    if cpus < TRIAL_DRIVER_CPUS:
        log.warning("the sweep driver's node has no CPU for the trial drivers: they may run on any node")
        return PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPUS}])
    return PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPUS}], bundle_label_selector=[{NODE_ID_LABEL_KEY: node}])


def trial_job(base: dict[str, Any], params: dict[str, Any], trials_uri: str, trial_id: str) -> JobConfig:
    """The validated training config of one trial.

    Its Train run is ``<trials_uri>/<trial_id>``: named by the trial id alone, so a restored trial
    (same id) finds its own checkpoints and continues from the last one.
    """
    data = apply_params(base, params)
    data["train"].update(storage_path=trials_uri, name=trial_id)
    return validate_job_config(data)


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], trials_uri: str, mlflow: MlflowTarget | None = None
) -> None:
    """The Tune function of every trial.

    Args:
        config: the trial's sampled parameters, by dotted training-config name.
        base: the sweep's resolved base training config (JSON dict).
        trials_uri: where the trials' Train runs live (``<sweep dir>/trials``).
        mlflow: the sweep's MLflow experiment (``tune.tuner.sweep_experiment``), when it has one.
    """
    import ray.tune

    from pipelines.raytrain.errors import describe_failure
    from pipelines.raytrain.training import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    job = trial_job(base, config, trials_uri, trial_id)
    # Built here, inside the trial: the callback talks to this trial's Tune session. The run's own
    # lines go to its run directory (metrics.jsonl); the sweep's driver prints the sweep's progress.
    outcome = run_training(job, callbacks=[EpochReportCallback()], quiet=True, mlflow=mlflow)
    if outcome.error is not None:
        raise RuntimeError(f"trial {trial_id}: training failed: {describe_failure(outcome.error)}")
