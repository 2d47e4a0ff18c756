"""The sweep's results: one row per trial, printed and written as CSV and Parquet; the best trial's config.

Files in the sweep directory, each written whole (a temporary file renamed, or one object put)::

    trials.csv, trials.parquet   one row per trial, best first
    best_config.json             the best trial's full training config (pipelines/train.py --config)
    best_trial.json              its id, parameters, metrics and best checkpoint URI
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.storage import join_uri, read_bytes, write_bytes
from tune.trial import EPOCHS_DONE

TABLE_CSV = "trials.csv"
TABLE_PARQUET = "trials.parquet"
BEST_CONFIG_FILE = "best_config.json"
BEST_TRIAL_FILE = "best_trial.json"
CHECKPOINT_KEY = "checkpoint_path"  # what TuneReportCallback adds: the Train checkpoint's URI


@dataclasses.dataclass
class TrialSummary:
    """One trial: its parameters, its best epoch by the sweep's metric, and its curve."""

    trial_id: str
    params: dict[str, Any]
    status: str  # done | stopped early | error
    best: dict[str, Any] | None  # the report of the best epoch (metric, AP, AP50, checkpoint_path ...)
    curve: list[tuple[int, float]]  # (epochs done, metric) per evaluated epoch
    epochs_run: int
    wall_time_s: float | None
    error: str | None = None


def read_text(uri: str) -> str | None:
    """A small text file's content, or None when it does not exist."""
    try:
        return read_bytes(uri).decode()
    except FileNotFoundError:
        return None


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    return tid or os.path.basename(result.path.rstrip("/")).removeprefix("trial_")


def summarize(result, param_names: list[str], metric: str, epochs: int) -> TrialSummary:
    """A TrialSummary from one Tune ``Result``; its history is the trial's progress file, one row per epoch."""
    df = result.metrics_dataframe
    history: dict[int, dict[str, Any]] = {}
    if df is not None and EPOCHS_DONE in df.columns:
        # A resumed trial may report an epoch twice: the last report of each epoch wins.
        for row in df.to_dict("records"):
            if row.get(EPOCHS_DONE) is not None and not math.isnan(row[EPOCHS_DONE]):
                history[int(row[EPOCHS_DONE])] = row
    evaluated = [r for _, r in sorted(history.items()) if r.get(metric) is not None and not math.isnan(r[metric])]
    # Ties go to the later epoch: the same score after more training.
    best = max(evaluated, key=lambda r: (r[metric], r[EPOCHS_DONE])) if evaluated else None
    epochs_run = max(history, default=0)
    config = result.config or {}
    if result.error is not None:
        status = "error"
    else:
        status = "done" if epochs_run >= epochs else "stopped early"
    return TrialSummary(
        trial_id=_trial_id(result),
        params={name: config.get(name) for name in param_names},
        status=status,
        best=best,
        curve=[(int(r[EPOCHS_DONE]), float(r[metric])) for r in evaluated],
        epochs_run=epochs_run,
        wall_time_s=(result.metrics or {}).get("time_total_s"),
        error=str(result.error).strip().splitlines()[0] if result.error is not None else None,
    )


def table_rows(summaries: list[TrialSummary], metric: str) -> list[dict[str, Any]]:
    """Rows of the trials table, best first (trials without an evaluation last)."""
    rows = []
    for s in summaries:
        b = s.best or {}
        rows.append(
            {
                "trial_id": s.trial_id,
                **s.params,
                "AP": b.get("AP"),
                "AP50": b.get("AP50"),
                "best_epoch": int(b[EPOCHS_DONE]) if b else None,
                "epochs_run": s.epochs_run,
                "stopped_early": s.status == "stopped early",
                "status": s.status,
                "wall_time_s": round(s.wall_time_s, 1) if s.wall_time_s is not None else None,
                "checkpoint": b.get(CHECKPOINT_KEY),
                "error": s.error,
            }
        )
    return sorted(rows, key=lambda r: (r[metric] is None, -(r[metric] or 0.0)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def format_table(rows: list[dict[str, Any]], param_names: list[str]) -> str:
    """The table printed at the end: one line per trial (the checkpoint URIs are in the files)."""
    columns = ["trial_id", *param_names, "AP", "AP50", "best_epoch", "epochs_run", "status", "wall_time_s"]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _scalar_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with each column Arrow and CSV can hold: a parameter whose values include lists or dicts
    (``data.train_short_sides``) or mix kinds (``100`` and ``"auto"``) as the values' JSON text."""
    rows = [dict(r) for r in rows]
    for name in dict.fromkeys(k for r in rows for k in r):
        values = [r[name] for r in rows if r.get(name) is not None]
        kinds = {bool if isinstance(v, bool) else float if isinstance(v, int | float) else type(v) for v in values}
        if len(kinds) > 1 or kinds & {list, dict}:
            for r in rows:
                if r.get(name) is not None:
                    r[name] = json.dumps(r[name])
    return rows


def write_table(sweep_uri: str, rows: list[dict[str, Any]]) -> list[str]:
    """trials.csv and trials.parquet in the sweep directory; returns their URIs."""
    table = pa.Table.from_pylist(_scalar_columns(rows))
    csv_buf, pq_buf = io.BytesIO(), io.BytesIO()
    pacsv.write_csv(table, csv_buf)
    pq.write_table(table, pq_buf)
    uris = [join_uri(sweep_uri, TABLE_CSV), join_uri(sweep_uri, TABLE_PARQUET)]
    write_bytes(uris[0], csv_buf.getvalue())
    write_bytes(uris[1], pq_buf.getvalue())
    return uris


def write_best(sweep_uri: str, best: TrialSummary, job_config: dict[str, Any]) -> list[str]:
    """best_config.json (a complete training config) and best_trial.json; returns their URIs."""
    b = best.best or {}
    info = {
        "trial_id": best.trial_id,
        "params": best.params,
        "AP": b.get("AP"),
        "AP50": b.get("AP50"),
        "best_epoch": b.get(EPOCHS_DONE),
        "checkpoint": b.get(CHECKPOINT_KEY),
        "status": best.status,
    }
    uris = [join_uri(sweep_uri, BEST_CONFIG_FILE), join_uri(sweep_uri, BEST_TRIAL_FILE)]
    write_bytes(uris[0], (json.dumps(job_config, indent=2) + "\n").encode())
    write_bytes(uris[1], (json.dumps(info, indent=2, default=str) + "\n").encode())
    return uris
