"""The run directory: config.json, data_report.json, metrics.jsonl, ap_table.md, curves, drawn images.

Written by one process, the driver, whichever nodes the workers run on. Layout
(``<storage_path>/<name>/``, next to Ray Train's ``checkpoint_*`` folders)::

    config.json        the resolved JobConfig
    status.json        "running", "finished" or "failed" (with the error), rewritten as the run goes
    data_report.json   per split: images used, bad input skipped (data.on_bad_input=skip) by kind, examples,
                       every file skipped or flagged while decoding (all sessions of a resumed run)
    metrics.jsonl      one JSON object a line: kind "step" | "epoch" | "eval" | "event"
    ap_table.md        the final COCO AP table
    loss.png, ap.png   curves
    val_images/*.png   validation images, true boxes green, predictions red with scores
    tensorboard/       train.loggers=tensorboard: event files (``tracking``)
    mlflow.db, mlartifacts/, mlflow_run.json   train.loggers=mlflow: the local store, the run's id
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipelines.job_config import CONFIG_FILE
from pipelines.storage import filesystem_for, is_remote, join_uri, local_path

METRICS_FILE = "metrics.jsonl"
AP_TABLE_FILE = "ap_table.md"
DATA_REPORT_FILE = "data_report.json"
STATUS_FILE = "status.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the registered checkpoints
MLFLOW_RUN_FILE = "mlflow_run.json"  # train.loggers=mlflow: the MLflow run a resumed run goes on in


class RunDir:
    """The run directory, written on the driver.

    For a local ``storage_path`` it is ``<storage_path>/<name>``; for a bucket the files are written
    to a local staging folder and copied to ``<storage_uri>/<name>/`` by ``sync()``.

    Args:
        storage_path: local folder or bucket URI.
        name: the run name.
        staging_root: local parent of the staging folder for bucket runs.
    """

    def __init__(self, storage_path: str, name: str, staging_root: str | None = None) -> None:
        self.storage_path = storage_path
        self.name = name
        if is_remote(storage_path):
            root = staging_root or os.path.join(os.path.expanduser("~"), ".cache", "ray-deformable-detr", "runs")
            self.uri = join_uri(storage_path, name)
            # One staging folder per bucket location: runs of one name in two buckets never share one.
            self.path = Path(root) / f"{name}-{hashlib.sha256(self.uri.partition('?')[0].encode()).hexdigest()[:12]}"
        else:
            self.path = Path(local_path(storage_path)) / name
            self.uri = str(self.path)
        self._lock = threading.Lock()

    def mkdir(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        if is_remote(self.storage_path):
            self._pull()
        return self

    def file(self, rel: str) -> Path:
        return self.path / rel

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, rel: str, text: str) -> Path:
        path = self.file(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def append_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps(r, default=_json_default) for r in records]
        if not lines:
            return
        with self._lock, open(self.file(METRICS_FILE), "a+b") as f:  # "a": every write goes to the end
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # a line torn by a killed driver stays alone, not glued to the next record
            f.write(("\n".join(lines) + "\n").encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.file(METRICS_FILE))

    def sync(self) -> None:
        """Copies the staging folder to the bucket (no-op for a local run directory)."""
        if not is_remote(self.storage_path):
            return
        fs, path = filesystem_for(self.uri)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(self.path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def _pull(self) -> None:
        # Resuming a bucket run: fetch its earlier metrics so the curves cover the whole run, its data
        # report (the images skipped so far), and its MLflow run's id, so that tracking goes on in it.
        # The bucket is the record, not a staging folder left here: another machine may have gone on with
        # the run since this one staged it.
        fs, path = filesystem_for(self.uri)
        for rel in (METRICS_FILE, CONFIG_FILE, MLFLOW_RUN_FILE, DATA_REPORT_FILE):
            info = fs.get_file_info(f"{path}/{rel}")
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as src, open(self.file(rel), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                self.file(rel).unlink(missing_ok=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line, from a killed driver, is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def latest_history(records: Sequence[dict[str, Any]], kind: str, key: str) -> list[dict[str, Any]]:
    """Records of one kind, keeping only the latest attempt where a restart replayed steps or epochs.

    After a worker failure the run goes back to its last checkpoint and logs some ``key`` values
    again; the replayed records supersede the earlier ones from that point on.
    """
    out: list[dict[str, Any]] = []
    for r in records:
        if r.get("kind") != kind or key not in r:
            continue
        while out and out[-1][key] >= r[key]:
            out.pop()
        out.append(r)
    return out


def write_status(run_dir: RunDir, state: str, **detail: Any) -> None:
    """status.json: "running", "finished" or "failed" (with the error), so a failed run never looks unfinished."""
    run_dir.write_json(STATUS_FILE, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **detail})
