"""A whole training run on the driver: pre-flight, datasets, fit, outputs; what train.py and Tune trials call."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import ray
import ray.train

from core.coco_eval import AP_KEYS, format_ap_table
from pipelines.config import CONFIG_FILE, JobConfig
from pipelines.data.report import data_report, format_data_report
from pipelines.raytrain.cluster import connect_ray, ray_logs_dir
from pipelines.raytrain.datasets import PreparedData, prepare_data
from pipelines.raytrain.errors import describe_failure
from pipelines.raytrain.metrics import MetricsPump, MetricsSink
from pipelines.raytrain.plots import write_final_outputs
from pipelines.raytrain.preflight import (
    check_resources,
    fetch_backbone_weights,
    latest_checkpoint_epoch,
    load_finetune_weights,
    preflight,
)
from pipelines.raytrain.run_dir import AP_TABLE_FILE, DATA_REPORT_FILE, RunDir, write_status
from pipelines.raytrain.trainer import build_trainer

log = logging.getLogger(__name__)


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


def run_training(
    job: JobConfig,
    *,
    address: str | None = None,
    callbacks: Sequence[Any] = (),
    quiet: bool = False,
) -> TrainOutcome:
    """Pre-flight, datasets, fit, outputs. ``job`` is validated; nothing starts when a check fails.

    Args:
        job: the run config; ``train.name`` names the run (a Tune trial sets one per trial).
        address: Ray cluster to join (default RAY_ADDRESS, else joined or started by ``connect_ray``).
        callbacks: extra Ray Train ``RunConfig`` callbacks (a Tune trial's ``TuneReportCallback``).
        quiet: print nothing (the run directory still gets every file); for Tune trials.

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
    check_resources(job, ray.cluster_resources(), strict=started_local)
    data = prepare_data(job, start_epoch=0 if last_epoch is None else last_epoch + 1)

    run_dir = RunDir(job.train.storage_path, job.train.name).mkdir()
    run_dir.write_json(CONFIG_FILE, job.model_dump(mode="json"))
    write_status(run_dir, "running")
    _say(out, f"run {job.train.name}: {run_dir.uri}")
    logs = ray_logs_dir()
    if logs:
        _say(out, f"  Ray's own logs (workers' output included): {logs}")
    _say(
        out,
        f"  {job.detr_config().variant()} {job.model.backbone}, {data.facts.num_train} train / "
        f"{data.facts.num_val} val images, {job.train.num_workers} workers x "
        f"{job.data.batch_size_per_worker} images (total batch {job.total_batch_size}), "
        f"{data.steps_per_epoch} steps/epoch, {job.train.epochs} epochs",
    )
    # What the annotation and file checks skipped, before any pixel is read.
    _say(out, format_data_report(write_data_report(data, run_dir), job.data.on_bad_input))

    sink = MetricsSink.remote()
    # Through the object store: every worker gets the weights, on whatever node it runs.
    weights_ref = ray.put(finetune_weights) if finetune_weights is not None else None
    trainer = build_trainer(job, data, sink=sink, weights=weights_ref, callbacks=callbacks)
    result, error = None, None
    with MetricsPump(sink, run_dir, out=out) as pump:
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # TrainingFailedError and friends: still write what we have
            error = e
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


def _say(out, text: str) -> None:
    if out is not None:
        print(text, file=out, flush=True)
