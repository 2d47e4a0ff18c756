"""Experiment tracking (``train.loggers``): the run's metrics fanned out to TensorBoard and MLflow.

The driver's ``MetricsPump`` hands every batch of records it drains (rank 0's, the only rank that sends
any) to ``Trackers.log``, the one place metrics reach the trackers; ``run_training`` calls
``Trackers.finish`` with the run's outcome. Both run on the driver, which owns the run directory
whichever nodes the workers run on (a bucket run's staging folder, synced with the rest).

- tensorboard: event files in ``<run dir>/tensorboard`` (``torch.utils.tensorboard``), every number of
  the step, epoch and eval records against the global step; at the end the AP table and the drawn
  validation images.
- mlflow: a run in ``MLFLOW_TRACKING_URI``, else in ``<run dir>/mlflow.db`` (SQLite: MLflow 3 keeps the
  plain ``./mlruns`` folder store in maintenance mode and refuses it by default) with artifacts in
  ``<run dir>/mlartifacts``; params = the resolved config flattened, metrics as for TensorBoard, the AP
  table, curves and drawn images as artifacts, the best checkpoint's URI as a tag. A resumed run goes on
  in the same MLflow run (its id is kept in ``<run dir>/mlflow_run.json``).

Ray's own integrations do not fit here: ``setup_mlflow`` runs inside the workers (which may sit on
another node than the run directory), and its logger callbacks are Tune callbacks, not Train V2 ones.

A tracker that fails (package missing, server down) is switched off with one warning; the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.evaluation import AP_KEYS, format_ap_table
from pipelines.job_config import JobConfig
from pipelines.raytrain.run_dir import MLFLOW_RUN_FILE, RunDir

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
DEFAULT_EXPERIMENT = "deformable-detr"

# The records whose numbers are tracked, and the prefix of their names ("train/loss_ce", "val/AP").
PREFIXES = {"step": "train", "epoch": "epoch", "eval": "val"}
# Counters and clocks, not measurements; checkpoint_score repeats AP (or -loss) and is -1e30 on
# unscored epochs; an epoch record repeats the eval record's AP numbers.
NOT_TRACKED = {
    "time",
    "epoch",
    "epochs_done",
    "data_epoch",
    "epoch_step",
    "global_step",
    "step",
    "steps_averaged",
    "step_images",
    "checkpoint_score",
}


def tracked_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics record under their tracked names; {} for records not tracked."""
    prefix = PREFIXES.get(record.get("kind"))
    if prefix is None:
        return {}
    skip = NOT_TRACKED | (set(AP_KEYS) if record["kind"] == "epoch" else set())
    return {
        f"{prefix}/{key}": float(value)
        for key, value in record.items()
        if key not in skip and isinstance(value, int | float | np.number) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    """Event files in the run directory's ``tensorboard/`` folder."""

    name = "tensorboard"

    def __init__(self, run_dir: RunDir, job: JobConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (the tracking extra)

        self.writer = SummaryWriter(log_dir=str(run_dir.file(TENSORBOARD_DIR)))
        self.writer.add_text("config", "```\n" + job.model_dump_json(indent=2) + "\n```")

    def log(self, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            for tag, value in tracked_scalars(r).items():
                self.writer.add_scalar(tag, value, global_step=r["global_step"], walltime=r.get("time"))
        self.writer.flush()

    def finish(self, summary: RunSummary) -> None:
        if summary.final_ap is not None:
            self.writer.add_text("val/ap_table", "```\n" + format_ap_table(summary.final_ap) + "\n```")
        for path in summary.images:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"val_images/{path.stem}", pixels, dataformats="HWC")
        self.writer.close()


class MlflowTracker:
    """One MLflow run: ``MLFLOW_TRACKING_URI``, else a SQLite store in the run directory."""

    name = "mlflow"

    def __init__(self, run_dir: RunDir, job: JobConfig) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # the store's schema set-up lines, at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.file(MLFLOW_DB)}"
        if uri.startswith(("http://", "https://")):
            # MLflow's default is 7 retries with exponential backoff: minutes of a stalled metrics
            # pump before a server that is down gives its one warning.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            retries = logging.getLogger("urllib3.connectionpool")
            if not any(isinstance(f, _MlflowRetryLines) for f in retries.filters):
                retries.addFilter(_MlflowRetryLines())
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run_dir
        self.run_id = self._resumed_run(uri)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        elif "MLFLOW_TRACKING_URI" in os.environ:
            experiment_id = self.client.create_experiment(experiment)
        else:
            artifacts = run_dir.file(MLFLOW_ARTIFACTS).resolve().as_uri()
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        run = self.client.create_run(experiment_id, run_name=job.train.name, tags={"run_dir": run_dir.uri})
        self.run_id = run.info.run_id
        run_dir.write_json(MLFLOW_RUN_FILE, {"tracking_uri": uri, "run_id": self.run_id})
        params = [Param(k, v) for k, v in flatten_config(job.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _resumed_run(self, uri: str) -> str | None:
        path = self.run_dir.file(MLFLOW_RUN_FILE)
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != uri:
            return None
        try:
            self.client.get_run(saved["run_id"])
        except Exception:  # a store that lost it (a bucket run resumed on another machine): a new run
            return None
        return saved["run_id"]

    def log(self, records: Sequence[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(tag, value, int(1000 * r.get("time", time.time())), r["global_step"])
            for r in records
            for tag, value in tracked_scalars(r).items()
        ]
        for i in range(0, len(metrics), 1000):  # MLflow's limit of metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, summary: RunSummary) -> None:
        for name in ("ap_table.md", "loss.png", "ap.png"):
            if self.run_dir.file(name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir.file(name)))
        for path in summary.images:
            self.client.log_artifact(self.run_id, str(path), artifact_path="val_images")
        if summary.best_checkpoint is not None:
            self.client.set_tag(self.run_id, "best_checkpoint", summary.best_checkpoint)
        self.client.set_terminated(self.run_id, status="FINISHED" if summary.succeeded else "FAILED")


class RunSummary:
    """What ``Trackers.finish`` records: the final AP, the best checkpoint's URI, the drawn images."""

    def __init__(
        self,
        *,
        succeeded: bool,
        final_ap: dict[str, float] | None = None,
        best_checkpoint: str | None = None,
        images: Iterable[Path] = (),
    ) -> None:
        self.succeeded = succeeded
        self.final_ap = final_ap
        self.best_checkpoint = best_checkpoint
        self.images = sorted(images)


TRACKERS: dict[str, Callable[[RunDir, JobConfig], Any]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}
TRACKING_HINT = "pip install 'ray-deformable-detr[tracking]'"


class Trackers:
    """The trackers of ``train.loggers``; one that raises is switched off with one ``warn`` line."""

    def __init__(self, trackers: Sequence[Any], warn: Callable[[str], None]) -> None:
        self.active = list(trackers)
        self.warn = warn

    @classmethod
    def open(cls, run_dir: RunDir, job: JobConfig, warn: Callable[[str], None]) -> Trackers:
        trackers = []
        for name in dict.fromkeys(job.train.loggers):  # each once
            try:
                trackers.append(TRACKERS[name](run_dir, job))
            except ImportError as e:
                warn(f"{name} tracking off: {e} ({TRACKING_HINT})")
            except Exception as e:
                warn(f"{name} tracking off: {_one_line(e)}")
        return cls(trackers, warn)

    def log(self, records: Sequence[dict[str, Any]]) -> None:
        """Rank 0's records, as the metrics pump drains them."""
        for tracker in list(self.active):
            self._call(tracker, "log", records)

    def finish(self, summary: RunSummary) -> None:
        for tracker in list(self.active):
            self._call(tracker, "finish", summary)
        self.active = []

    def _call(self, tracker: Any, method: str, arg: Any) -> None:
        try:
            getattr(tracker, method)(arg)
        except Exception as e:  # tracking never fails a run
            self.active.remove(tracker)
            self.warn(f"{tracker.name} tracking off: {_one_line(e)}")


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 2e-4}}`` -> ``{"train.lr": "0.0002"}`` (lists and None as JSON)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


class _MlflowRetryLines(logging.Filter):
    """Drops urllib3's "Retrying ..." lines of MLflow's requests: if every try fails, the tracker's one
    warning says so; other requests' lines pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/mlflow/" not in record.getMessage()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}"
