"""A whole training run on the driver (pre-flight, datasets, fit, outputs; what train.py and Tune trials call),
and the one place a ``TorchTrainer`` is built: training, evaluation and Tune trials differ by the loop they run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from core.evaluation import AP_KEYS, format_ap_table
from pipelines.data.datasets import ingest_options
from pipelines.data.report import data_report, format_data_report
from pipelines.job_config import CONFIG_FILE, JobConfig
from pipelines.raytrain.cluster import cluster_autoscales, connect_ray, on_driver_node, ray_logs_dir
from pipelines.raytrain.errors import describe_failure
from pipelines.raytrain.metrics import MetricsPump, MetricsSink, RecordsWritten
from pipelines.raytrain.preflight import (
    check_resources,
    fetch_backbone_weights,
    latest_checkpoint_epoch,
    load_finetune_weights,
    preflight,
)
from pipelines.raytrain.run_datasets import DetectionDataConfig, PreparedData, prepare_data
from pipelines.raytrain.run_dir import AP_TABLE_FILE, DATA_REPORT_FILE, RunDir, write_status
from pipelines.raytrain.run_plots import write_final_outputs
from pipelines.raytrain.state import SCORE_KEY, resolve_checkpoint
from pipelines.raytrain.tracking import MlflowTarget, RunSummary, Trackers
from pipelines.raytrain.worker import train_loop_per_worker
from pipelines.raytrain.worker_config import WorkerConfig
from pipelines.storage import filesystem_for, is_remote

log = logging.getLogger(__name__)

# Ray Train routes print() to its logger even inside contextlib.redirect_stdout, which would undo
# core's silencing of pycocotools on every evaluation.
WORKER_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def build_trainer(
    job: JobConfig,
    data: PreparedData,
    *,
    loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    sink: Any = None,
    weights: ray.ObjectRef | None = None,
    callbacks: Sequence[Any] = (),
    name: str | None = None,
    storage_path: str | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a run, an evaluation or a Tune trial.

    Args:
        job: the resolved config (``preflight``).
        data: from ``prepare_data``.
        loop: the worker function: ``train_loop_per_worker`` or ``eval_loop_per_worker``.
        sink: ``MetricsSink`` actor for per-step records, progress and drawn images, or None.
        weights: ObjectRef of a state_dict: the fine-tuning start for training, the model under
            evaluation for evaluation; None for a fresh training run.
        callbacks: extra ``RunConfig`` callbacks, e.g. ``ray.tune.integration.ray_train.TuneReportCallback()``.
        name: the Ray Train run name (a folder under the storage path); default ``job.train.name``.
            The same storage path and name resume that run from its latest checkpoint.
        storage_path: where Ray Train keeps checkpoints and its run state; default ``job.train.storage_path``.
    """
    t = job.train
    resources = {"CPU": t.cpus_per_worker, **t.worker_resources}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    storage_fs, storage = None, storage_path or t.storage_path
    if is_remote(storage):
        storage_fs, storage = filesystem_for(storage)
    worker = WorkerConfig(
        job=job,
        dataset=data.facts,
        steps_per_epoch=data.steps_per_epoch,
        train_rows=data.train_rows,
        sink=sink,
        epoch_clock=data.epoch_clock,
        weights=weights,
    )
    return TorchTrainer(
        loop,
        train_loop_config=worker.to_loop_config(),
        scaling_config=ray.train.ScalingConfig(
            # A (min, max) tuple makes the run elastic: restarts take the workers the cluster holds.
            num_workers=(t.min_workers, t.max_workers) if t.elastic else t.max_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=name or t.name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            # Spot reclamations restart the group without using up max_failures, kept for real errors.
            failure_config=ray.train.FailureConfig(
                max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max",  # SCORE_KEY is AP, or -loss without evaluation
            ),
            callbacks=list(callbacks) or None,
            worker_runtime_env=WORKER_RUNTIME_ENV,
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
        datasets=data.datasets,
        # Only "train" is split equally; DetectionDataConfig splits "val" without dropping images.
        dataset_config=DetectionDataConfig(
            datasets_to_split=[k for k in data.datasets if k == "train"], execution_options=ingest_options()
        ),
    )


@dataclasses.dataclass
class TrainOutcome:
    """What a run left: its directory, Ray's Result, the last validation AP, the error if it failed."""

    run_dir: RunDir
    result: ray.train.Result | None
    final_ap: dict[str, float] | None
    error: BaseException | None
    data_report: dict[str, Any] = dataclasses.field(default_factory=dict)


def write_data_report(data: PreparedData, run_dir: RunDir) -> dict[str, Any]:
    """Writes data_report.json (what was skipped so far) into the run directory; returns the report."""
    report = data_report(data.infos)
    run_dir.write_json(DATA_REPORT_FILE, report)
    return report


def restore_data_report(data: PreparedData, run_dir: RunDir) -> None:
    """Gives a resumed run's ledgers what its data_report.json lists as found while decoding."""
    path = run_dir.file(DATA_REPORT_FILE)
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        for split, info in data.infos.items():
            info.restore_found((earlier.get(split) or {}).get("found_while_decoding") or {})
    except (OSError, ValueError, TypeError, AttributeError) as e:  # unreadable: this session's findings only
        log.warning("%s: the earlier sessions' findings cannot be read (%s)", path, e)


def _workers_text(t) -> str:
    """ "8", or "4-8" for an elastic run."""
    return f"{t.min_workers}-{t.max_workers}" if t.elastic else str(t.max_workers)


def run_training(
    job: JobConfig,
    *,
    address: str | None = None,
    callbacks: Sequence[Any] = (),
    quiet: bool = False,
    mlflow: MlflowTarget | None = None,
) -> TrainOutcome:
    """Pre-flight, datasets, fit, outputs. ``job`` is validated; nothing starts when a check fails.

    Args:
        job: the run config; ``train.name`` names the run (a Tune trial sets one per trial).
        address: Ray cluster to join (default RAY_ADDRESS, else joined or started by ``connect_ray``).
        callbacks: extra Ray Train ``RunConfig`` callbacks (a Tune trial's ``TuneReportCallback``).
        quiet: print nothing (the run directory still gets every file); for Tune trials.
        mlflow: with ``train.loggers`` naming mlflow, the experiment this run is one run of (a sweep's),
            instead of ``MLFLOW_TRACKING_URI`` or the run directory's store.

    Raises:
        PreflightError: a check failed (before any worker started).
    """
    out = None if quiet else sys.stdout
    job = preflight(job)
    finetune_weights = load_finetune_weights(job)
    last_epoch = latest_checkpoint_epoch(job)
    if last_epoch is None and finetune_weights is None:
        fetch_backbone_weights(job)  # only a fresh start reads them
    started_local = connect_ray(job, address)
    check_resources(job, ray.cluster_resources(), strict=started_local or not cluster_autoscales())
    data = prepare_data(job, start_epoch=0 if last_epoch is None else last_epoch + 1)

    run_dir = RunDir(job.train.storage_path, job.train.name).mkdir()
    if last_epoch is not None:  # the images earlier sessions skipped while decoding stay in the report
        restore_data_report(data, run_dir)
    run_dir.write_json(CONFIG_FILE, job.model_dump(mode="json"))
    write_status(run_dir, "running")
    _say(out, f"run {job.train.name}: {run_dir.uri}")
    logs = ray_logs_dir()
    if logs:
        _say(out, f"  Ray's own logs (workers' output included): {logs}")
    _say(
        out,
        f"  {job.detr_config().variant()} {job.model.backbone}, {data.facts.num_train} train / "
        f"{data.facts.num_val} val images, {_workers_text(job.train)} workers x "
        f"{job.data.batch_size_per_worker} images (total batch {job.total_batch_size}), "
        f"{data.steps_per_epoch} steps/epoch{' at most' if job.data.on_bad_input == 'skip' else ''}, "
        f"{job.train.epochs} epochs",
    )
    if job.data.on_bad_input == "skip":
        # Images that fail to decode are found (and dropped) only while an epoch runs.
        _say(out, "  (data.on_bad_input=skip: images dropped while decoding can end an epoch before its last step)")
    # What the annotation and file checks skipped, before any pixel is read.
    _say(out, format_data_report(write_data_report(data, run_dir), job.data.on_bad_input))

    trackers = Trackers.open(run_dir, job, warn=_warner(out), mlflow=mlflow)
    sink = MetricsSink.options(**on_driver_node()).remote()
    # Through the object store: every worker gets the weights, on whatever node it runs.
    weights_ref = ray.put(finetune_weights) if finetune_weights is not None else None
    # Whoever gets the reports after us sees an epoch only once its records are written.
    listeners = [RecordsWritten(sink), *callbacks] if callbacks else []
    trainer = build_trainer(job, data, sink=sink, weights=weights_ref, callbacks=listeners)
    result, error = None, None
    pump = MetricsPump(sink, run_dir, out=out, trackers=trackers, first_step_timeout_s=job.train.first_step_timeout_s)
    with pump:
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # TrainingFailedError and friends: still write what we have
            error = e
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train aborts the run (and may sys.exit)
            error = Interrupted(
                f"SIGINT; `python pipelines/train.py --resume {run_dir.uri}` goes on from the last checkpoint"
            )
    final_ap = {k: pump.last_eval[k] for k in AP_KEYS} if pump.last_eval else None
    if final_ap is None:
        evals = [r for r in run_dir.read_metrics() if r.get("kind") == "eval"]
        final_ap = {k: evals[-1][k] for k in AP_KEYS} if evals else None
    if final_ap is not None:
        run_dir.write_text(AP_TABLE_FILE, format_ap_table(final_ap) + "\n")
    try:
        written = write_final_outputs(run_dir, ray.get(sink.vis.remote()))
    except Exception as e:  # pictures are a nicety, never the reason a run fails
        log.warning("could not draw the run's pictures: %s", e)
        written = []
    report = write_data_report(data, run_dir)  # again, now with the images skipped while decoding
    trackers.finish(
        RunSummary(
            succeeded=error is None,
            final_ap=final_ap,
            best_checkpoint=best_checkpoint_uri(run_dir),
            images=[p for p in written if p.parent.name == "val_images"],
        )
    )
    if error is None:
        write_status(run_dir, "finished")
    else:
        write_status(run_dir, "failed", error=describe_failure(error))
    run_dir.sync()
    ray.kill(sink)
    if final_ap is not None:
        _say(out, "\nfinal COCO AP (val):\n" + format_ap_table(final_ap))
    _say(out, "\n" + format_data_report(report, job.data.on_bad_input))
    if written:
        _say(out, f"curves and images: {', '.join(os.path.relpath(p, run_dir.path) for p in written)}")
    _say(out, f"run directory: {run_dir.uri}")
    return TrainOutcome(run_dir, result, final_ap, error, report)


class Interrupted(RuntimeError):
    """A run stopped by Ctrl-C: its outputs and status are still written."""


def best_checkpoint_uri(run_dir: RunDir) -> str | None:
    """The URI of the run's best checkpoint (else its latest): the one evaluate.py and infer.py take for the
    run directory, ties included (``resolve_checkpoint``); None without one."""
    try:
        best = resolve_checkpoint(run_dir.uri)
    except (OSError, ValueError):  # no checkpoint yet, or no snapshot of them
        return None
    return None if best == run_dir.uri else best


def _warner(out) -> Callable[[str], None]:
    """One warning line: on the console beside the progress lines, or to the log when the run is quiet."""
    if out is None:
        return lambda message: log.warning("%s", message)
    return lambda message: _say(out, f"warning: {message}")


def _say(out, text: str) -> None:
    if out is not None:
        print(text, file=out, flush=True)
