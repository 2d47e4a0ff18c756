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
  in the same MLflow run (its id is kept in ``<run dir>/mlflow_run.json``). A sweep's trials are runs of
  one experiment that the sweep's driver names (``MlflowTarget``).

Ray's own integrations do not fit here: ``setup_mlflow`` runs inside the workers (which may sit on
another node than the run directory), and its logger callbacks are Tune callbacks, not Train V2 ones.

A tracker that fails (package missing, server down) is switched off with one warning; the run goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    """Event files in the run directory's ``tensorboard/`` folder.

    Steps trained again (after a worker restart, or on resume from a checkpoint older than the last
    step logged) replace the first attempt's: the writer starts a new file with ``purge_step``, and
    TensorBoard hides the earlier events from that step on, as ``metrics.jsonl``'s readers keep the
    replayed attempt.
    """

    name = "tensorboard"

    def __init__(self, run_dir: RunDir, job: JobConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (the tracking extra)

        self._writer_at = functools.partial(SummaryWriter, log_dir=str(run_dir.file(TENSORBOARD_DIR)))
        self.writer = self._writer_at()
        self.writer.add_text("config", "```\n" + job.model_dump_json(indent=2) + "\n```")
        steps = [r["global_step"] for r in run_dir.read_metrics() if r.get("kind") == "step"]
        self.last_step = max(steps, default=0)  # a resumed run's: logged by its earlier sessions

    def log(self, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            if r.get("kind") == "step":
                if r["global_step"] <= self.last_step:  # a replay: hide the first attempt from here on
                    self.writer.close()
                    self.writer = self._writer_at(purge_step=r["global_step"])
                self.last_step = r["global_step"]
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


@dataclasses.dataclass(frozen=True)
class MlflowTarget:
    """The experiment of runs that share one, not their run directories' stores: a sweep's trials.

    Whoever makes one opens the experiment first (``open_experiment``), so that runs starting together
    never race to set up the store. Each run is named by ``train.name`` and carries ``tags``.
    """

    tracking_uri: str
    experiment: str
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


def local_store(folder: Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the SQLite store kept in ``folder``."""
    return f"sqlite:///{folder / MLFLOW_DB}", (folder / MLFLOW_ARTIFACTS).resolve().as_uri()


def open_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment ``name`` in the store, created (with its artifact location) if new."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def end_unfinished_runs(target: MlflowTarget, statuses: Mapping[str, str]) -> None:
    """Ends the target's runs that are still RUNNING with their status by run name (FAILED, KILLED):
    runs whose process was stopped (a sweep's scheduler stops trials) never ended them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=target.tracking_uri)
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment is None:
        return
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=10_000)
    for run in running:
        status = statuses.get(run.info.run_name)
        if status is not None and all(run.data.tags.get(k) == v for k, v in target.tags.items()):
            client.set_terminated(run.info.run_id, status=status)


class MlflowTracker:
    """One MLflow run: in ``target``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the run directory."""

    name = "mlflow"

    def __init__(self, run_dir: RunDir, job: JobConfig, target: MlflowTarget | None = None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        artifacts = None
        if target is not None:
            uri, experiment, tags = target.tracking_uri, target.experiment, target.tags
        else:
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            experiment, tags = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT, {}
            if uri is None:
                uri, artifacts = local_store(run_dir.path)
        _quiet_mlflow(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run_dir
        self.run_id = self._resumed_run(uri)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = open_experiment(uri, experiment, artifacts)
        run = self.client.create_run(experiment_id, run_name=job.train.name, tags={"run_dir": run_dir.uri, **tags})
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


TRACKING_HINT = "pip install 'ray-deformable-detr[tracking]'"


class Trackers:
    """The trackers of ``train.loggers``; one that raises is switched off with one ``warn`` line."""

    def __init__(self, trackers: Sequence[Any], warn: Callable[[str], None]) -> None:
        self.active = list(trackers)
        self.warn = warn

    @classmethod
    def open(
        cls, run_dir: RunDir, job: JobConfig, warn: Callable[[str], None], mlflow: MlflowTarget | None = None
    ) -> Trackers:
        """The trackers of ``job.train.loggers``; ``mlflow``: the shared experiment of a sweep's trials."""
        factories: dict[str, Callable[[], Any]] = {
            "tensorboard": lambda: TensorBoardTracker(run_dir, job),
            "mlflow": lambda: MlflowTracker(run_dir, job, mlflow),
        }
        trackers = []
        for name in dict.fromkeys(job.train.loggers):  # each once
            try:
                trackers.append(factories[name]())
            except Exception as e:
                warn(tracking_off(name, e))
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
            self.warn(tracking_off(tracker.name, e))


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


def _quiet_mlflow(uri: str) -> None:
    """MLflow's store set-up lines off; for a server, few and short retries of its requests, not logged."""
    for noisy in ("mlflow", "alembic"):  # the store's schema set-up lines, at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if uri.startswith(("http://", "https://")):
        # MLflow's default is 7 retries with exponential backoff: minutes of a stalled metrics
        # pump before a server that is down gives its one warning.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        retries = logging.getLogger("urllib3.connectionpool")
        if not any(isinstance(f, _MlflowRetryLines) for f in retries.filters):
            retries.addFilter(_MlflowRetryLines())


def tracking_off(name: str, e: BaseException) -> str:
    """The one warning line of a tracker that cannot work: what failed, and the extra when a package is missing."""
    if isinstance(e, ImportError):
        return f"{name} tracking off: {e} ({TRACKING_HINT})"
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{name} tracking off: {type(e).__name__}: {first[:200]}"
