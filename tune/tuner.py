"""Runs a sweep: Ray, the sweep directory, trial resources and concurrency, a new or restored Tuner, outputs.

Sweep directory (``<storage_path>/<name>/``, also Tune's experiment directory)::

    sweep_config.json, base_config.json   the sweep config and its resolved base training config
    trial_<id>/                           Tune's per-trial folder (progress, the driver's stdout/stderr)
    trials/<id>/                          each trial's Ray Train run: checkpoints, metrics.jsonl, curves
    mlflow.db, mlartifacts/               train.loggers=mlflow: the trials' experiment (``sweep_experiment``)
    trials.csv, trials.parquet, best_config.json, best_trial.json, metric_vs_params.png, metric_curves.png
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import ray
from ray import tune

from pipelines.job_config import ConfigError, JobConfig, validate_job_config
from pipelines.raytrain.cluster import connect_ray
from pipelines.raytrain.preflight import PreflightError, preflight, storage_root
from pipelines.raytrain.tracking import MlflowTarget, end_unfinished_runs, local_store, open_experiment, tracking_off
from pipelines.storage import filesystem_for, is_remote, join_uri, write_bytes
from tune.progress import SweepProgress
from tune.results import (
    TrialSummary,
    read_text,
    summarize,
    table_rows,
    write_best,
    write_table,
)
from tune.space import SearchSpace, apply_params
from tune.sweep_config import SweepConfig
from tune.sweep_plots import CURVES_PLOT, PARAMS_PLOT, plot_curves, plot_params
from tune.trial import EPOCHS_DONE, run_trial, trial_driver_resources

log = logging.getLogger(__name__)

SWEEP_CONFIG_FILE = "sweep_config.json"
BASE_CONFIG_FILE = "base_config.json"
TRIALS_DIR = "trials"


@dataclasses.dataclass
class SweepOutcome:
    sweep_uri: str
    summaries: list[TrialSummary]
    rows: list[dict[str, Any]]
    best: TrialSummary | None
    files: list[str]
    resumed: bool
    concurrency: int = 1


# Training fields that change what a trial holds; when searched, the largest trial sets the concurrency.
RESOURCE_FIELDS = (
    "train.num_workers",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.use_gpu",
    "data.num_decode_workers",
)


def _trial_need(job: JobConfig) -> dict[str, float]:
    t = job.train
    # Without CPUs outside the worker group, a trial's decode tasks wait forever (the same count
    # pipelines.raytrain.cluster.connect_ray adds when it sizes a local Ray).
    need = {"CPU": t.max_workers * t.cpus_per_worker + max(2, job.data.num_decode_workers or 2)}
    if t.use_gpu:
        need["GPU"] = t.max_workers * t.gpus_per_worker
    return need


def trial_resources(job: JobConfig, space: SearchSpace | None = None) -> dict[str, float]:
    """What one trial holds while it trains: its worker group, plus CPUs for its Ray Data decode tasks.

    With resource fields in ``space``, fixed or searched, the most any of their candidate combinations
    asks for.
    """
    if space is None:
        return _trial_need(job)
    names = [n for n in RESOURCE_FIELDS if n in space.domains]
    need: dict[str, float] = {}
    base = job.model_dump(mode="json")
    for combo in itertools.product(*(space.domains[n].candidates for n in names)):  # one, empty, without names
        trial = validate_job_config(apply_params(base, {**space.fixed, **dict(zip(names, combo))}))
        for k, v in _trial_need(trial).items():
            need[k] = max(need.get(k, 0.0), v)
    return need


def max_concurrent_trials(
    job: JobConfig, cluster: dict[str, float], requested: int | None, strict: bool, space: SearchSpace | None = None
) -> int:
    """How many trials run at once: as many as the cluster holds (GPUs, else CPUs), at most ``requested``.

    Args:
        strict: a local Ray this process started (cannot grow): a trial that does not fit is an error.
            On a joined cluster, which may autoscale, the requested number is kept with a warning.

    Raises:
        PreflightError: one trial does not fit a local Ray.
    """
    need = trial_resources(job, space)
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    have = ", ".join(f"{k} {cluster.get(k, 0.0):g}" for k in need)
    wants = ", ".join(f"{k} {v:g}" for k, v in need.items())
    if fits < 1:
        msg = f"one trial needs {wants} (workers plus data decoding), the cluster has {have}"
        if strict:
            raise PreflightError(msg + ": lower train.num_workers / train.cpus_per_worker in the base config")
        log.warning("%s; waiting for the cluster to scale up", msg)
        return requested or 1
    if requested is None:
        return fits
    if requested > fits:
        if strict:
            print(f"max_concurrent_trials={requested} lowered to {fits}: each trial needs {wants}, Ray has {have}")
            return fits
        log.warning("max_concurrent_trials=%d > %d that fit now (%s); relying on autoscaling", requested, fits, have)
    return requested


def _tune_storage(uri: str):
    """(storage_path, storage_filesystem) for Tune: a bucket URI goes through our filesystem (endpoint options)."""
    if is_remote(uri):
        return filesystem_for(uri)[::-1]
    return uri, None


def _searcher(cfg: SweepConfig, concurrency: int):
    """The search algorithm, holding the concurrency cap (Tune ignores max_concurrent_trials for a generator)."""
    if cfg.searcher.kind == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError(
                'searcher.kind=optuna needs Optuna: pip install -e ".[tune]" (or pip install optuna)'
            ) from e
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.searcher.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.searcher.seed, max_concurrent=concurrency)


def _scheduler(cfg: SweepConfig, epochs: int):
    if cfg.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.scheduler
    # max_t one past the last epoch: ASHA stops every trial that reaches max_t, which would kill the
    # survivors at their last report, before their run writes its final outputs. Rungs stay the same.
    return ASHAScheduler(
        time_attr=EPOCHS_DONE, max_t=epochs + 1, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _check_same_sweep(sweep_uri: str, cfg: SweepConfig, restorable: bool) -> bool:
    """True when the directory holds this sweep already; ConfigError when it holds another one that Tune
    can resume. A sweep that never got as far as Tune's state (it failed first) is no sweep to keep."""
    saved = read_text(join_uri(sweep_uri, SWEEP_CONFIG_FILE))
    if saved is None or not restorable:
        return False
    # The directory is the same whichever way its path is written.
    before, now = json.loads(saved), cfg.model_dump(mode="json", exclude={"storage_path"})
    before.pop("storage_path", None)
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ConfigError(
            f"{sweep_uri} holds another sweep (different {', '.join(changed)}): run the same command to resume "
            f"it, or give this one its own --set name=..."
        )
    return True


def run_sweep(
    cfg: SweepConfig, job: JobConfig, space: SearchSpace, *, address: str | None = None, progress_every_s=30.0
) -> SweepOutcome:
    """Runs (or resumes) the sweep to its end and writes its outputs.

    Args:
        cfg, job, space: from tune.sweep_config.load_sweep_config (validated).
        address: Ray cluster to join; default RAY_ADDRESS, else a local Ray.

    Raises:
        ConfigError, PreflightError: before any trial starts.
    """
    # Once, before any trial: absolute paths (trials run in other directories), the demo data
    # generated (concurrent trials would race to write it), the data and storage reachable.
    job = preflight(job)
    storage = storage_root(cfg.storage_path)  # as a run's: under `ray job submit`, outside Ray's working dir
    sweep_uri = join_uri(storage, cfg.sweep_name)
    exp_path, exp_fs = _tune_storage(sweep_uri)
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=exp_fs)
    same = _check_same_sweep(sweep_uri, cfg, resumed)
    started_local = connect_ray(job, address)
    concurrency = max_concurrent_trials(job, ray.cluster_resources(), cfg.max_concurrent_trials, started_local, space)

    base = job.model_dump(mode="json")
    if not same:
        write_bytes(join_uri(sweep_uri, SWEEP_CONFIG_FILE), (cfg.model_dump_json(indent=2) + "\n").encode())
        write_bytes(join_uri(sweep_uri, BASE_CONFIG_FILE), (json.dumps(base, indent=2) + "\n").encode())
    trials_uri = join_uri(sweep_uri, TRIALS_DIR)
    mlflow = sweep_experiment(job, sweep_uri, cfg.sweep_name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, trials_uri=trials_uri, mlflow=mlflow), trial_driver_resources()
    )
    epochs = job.train.epochs
    storage_path, storage_fs = _tune_storage(storage)
    if resumed:
        print(f"resuming sweep {sweep_uri}: finished trials are kept, interrupted ones continue", flush=True)
        tuner = tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=exp_fs
        )
    else:
        print(
            f"sweep {sweep_uri}: {space.num_trials(cfg.num_trials)} trials ({cfg.searcher.kind} search, {cfg.scheduler.kind} "
            f"scheduler on {cfg.metric}), {epochs} epochs each, {concurrency} at a time",
            flush=True,
        )
        for name, d in space.domains.items():
            print(f"  {name}: {d.describe()}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_param_space(),
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode="max",
                num_samples=cfg.num_trials,
                search_alg=_searcher(cfg, concurrency),
                scheduler=_scheduler(cfg, epochs),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.sweep_name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                callbacks=[
                    SweepProgress(cfg.metric, epochs, space.num_trials(cfg.num_trials), every_s=progress_every_s)
                ],
                log_to_file=True,  # each trial's own training output goes to its folder, not this console
                verbose=0,
            ),
        )
    grid = tuner.fit()
    outcome = write_outputs(sweep_uri, grid, cfg, job, space, resumed)
    outcome.concurrency = concurrency
    if mlflow is not None:
        end_trial_runs(mlflow, outcome.summaries)
    return outcome


def sweep_experiment(job: JobConfig, sweep_uri: str, name: str) -> MlflowTarget | None:
    """With ``train.loggers`` naming mlflow: the one experiment whose runs are the sweep's trials.

    The store is ``MLFLOW_TRACKING_URI`` as this driver sees it (the trials are told, wherever they run),
    else ``<sweep dir>/mlflow.db`` with artifacts in ``<sweep dir>/mlartifacts``; the experiment is
    ``MLFLOW_EXPERIMENT_NAME``, else the sweep's name. Each trial's run is named by its trial id and
    tagged ``sweep`` with the sweep directory. A sweep in a bucket without a tracking URI has no file for
    SQLite: its trials keep their runs in their own run directories, as a store that cannot be opened
    here leaves them to try on their own.
    """
    if "mlflow" not in job.train.loggers:
        return None
    uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
    if uri is None:
        if is_remote(sweep_uri):
            print(
                "mlflow: each trial's run stays in its own run directory (a sweep in a bucket); "
                "export MLFLOW_TRACKING_URI for one experiment of them all",
                flush=True,
            )
            return None
        uri, artifacts = local_store(Path(sweep_uri))
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    try:
        open_experiment(uri, experiment, artifacts)
    except Exception as e:
        log.warning("%s", tracking_off("mlflow", e))
        return None
    print(f"mlflow: the trials are runs of experiment {experiment!r} in {uri}", flush=True)
    return MlflowTarget(uri, experiment, {"sweep": sweep_uri})


# A trial's status in the sweep's table -> its MLflow run's, where the trial could not end it itself.
RUN_STATUSES = {"stopped early": "KILLED", "error": "FAILED"}


def end_trial_runs(target: MlflowTarget, summaries: list[TrialSummary]) -> None:
    """The MLflow runs of trials that the scheduler stopped (or that crashed) end KILLED (FAILED)."""
    statuses = {s.trial_id: RUN_STATUSES[s.status] for s in summaries if s.status in RUN_STATUSES}
    try:
        end_unfinished_runs(target, statuses)
    except Exception as e:
        log.warning("%s", tracking_off("mlflow", e))


def write_outputs(sweep_uri: str, grid, cfg: SweepConfig, job: JobConfig, space: SearchSpace, resumed: bool):
    """The trials table (printed, CSV, Parquet), the best trial's config, and the plots."""
    names = list(space.domains)
    summaries = [summarize(r, names, cfg.metric, job.train.epochs) for r in grid]
    rows = table_rows(summaries, cfg.metric)
    files = write_table(sweep_uri, rows)
    scored = [s for s in summaries if s.best is not None]
    best = max(scored, key=lambda s: s.best[cfg.metric]) if scored else None
    if best is not None:
        data = apply_params(job.model_dump(mode="json"), {**space.fixed, **best.params})
        # Trained again from this file, it is a run of its own: the base's storage, a fresh name.
        data["train"].update(name=None, storage_path=job.train.storage_path)
        config = validate_job_config(data).model_dump(mode="json")
        files += write_best(sweep_uri, best, config)
    try:
        write_bytes(join_uri(sweep_uri, PARAMS_PLOT), plot_params(summaries, space.domains, cfg.metric))
        write_bytes(join_uri(sweep_uri, CURVES_PLOT), plot_curves(summaries, cfg.metric))
        files += [join_uri(sweep_uri, PARAMS_PLOT), join_uri(sweep_uri, CURVES_PLOT)]
    except Exception as e:  # pictures are a nicety, never the reason a sweep fails
        log.warning("could not draw the sweep's plots: %s", e)
    return SweepOutcome(sweep_uri, summaries, rows, best, files, resumed)
