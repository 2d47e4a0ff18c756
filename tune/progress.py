"""Progress of a sweep on the driver: one line of trials running / done / stopped and the best metric so far.

Every count is read off Tune's trial list at each step, so a restored sweep's line includes the
trials finished before the interruption.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from tune.trial import EPOCHS_DONE


def trial_state(trial, epochs: int) -> str:
    """pending | running | done | stopped (early, by the scheduler) | error | paused."""
    status = trial.status
    if status == "TERMINATED":
        done = (trial.last_result or {}).get(EPOCHS_DONE, 0)
        return "done" if done >= epochs else "stopped"
    return {"RUNNING": "running", "ERROR": "error", "PAUSED": "paused"}.get(status, "pending")


def best_so_far(trials, metric: str) -> tuple[float, Any] | None:
    """(best metric, trial) over every result of every trial, or None before the first evaluation."""
    best = None
    for t in trials:
        value = t.metric_analysis.get(metric, {}).get("max")
        if value is not None and (best is None or value > best[0]):
            best = (value, t)
    return best


def format_progress(trials, metric: str, epochs: int, elapsed_s: float, total: int | None = None) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        state = trial_state(t, epochs)
        counts[state] = counts.get(state, 0) + 1
    parts = [f"{counts.get(k, 0)} {k}" for k in ("running", "done", "stopped", "error", "pending") if counts.get(k)]
    if total is not None and total > len(trials):
        parts.append(f"{total - len(trials)} to sample")
    line = f"[sweep {elapsed_s / 60:.1f} min] trials: " + ", ".join(parts or ["none yet"])
    best = best_so_far(trials, metric)
    if best is not None:
        value, t = best
        line += f"; best {metric} {value:.4f} (trial {t.trial_id})"
    return line


class SweepProgress(Callback):
    """Prints the progress line every ``every_s`` seconds and whenever a trial ends."""

    def __init__(self, metric: str, epochs: int, total: int, every_s: float = 30.0, out=None) -> None:
        self.metric, self.epochs, self.total, self.every_s = metric, epochs, total, every_s
        self.out = out
        self._start = time.monotonic()
        self._last = float("-inf")

    def setup(self, **info) -> None:
        # Called as each run of the sweep starts, a resumed one included (this object is restored
        # from the sweep's saved state, its clock from another process).
        self._start = time.monotonic()
        self._last = float("-inf")

    def _print(self, trials, extra: str = "") -> None:
        line = format_progress(trials, self.metric, self.epochs, time.monotonic() - self._start, self.total)
        print(extra + line, file=self.out or sys.stdout, flush=True)
        self._last = time.monotonic()

    def on_step_end(self, iteration: int, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration: int, trials, trial, **info) -> None:
        r = trial.last_result or {}
        what = "finished" if r.get(EPOCHS_DONE, 0) >= self.epochs else "stopped early"
        value = trial.metric_analysis.get(self.metric, {}).get("max")
        shown = f"best {self.metric} {value:.4f}" if value is not None else f"no {self.metric}"
        self._print(trials, f"trial {trial.trial_id} {what} after {r.get(EPOCHS_DONE, 0)} epochs, {shown}\n")

    def on_trial_error(self, iteration: int, trials, trial, **info) -> None:
        self._print(trials, f"trial {trial.trial_id} failed (its error.txt is in {trial.path})\n")
