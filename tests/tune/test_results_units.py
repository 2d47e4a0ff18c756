"""A trial's summary from its Tune result: best epoch, status and curve (stand-in results, no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from tune.results import summarize


def result(rows, error=None):
    """A stand-in for Tune's Result: the progress rows a trial reported, one per report."""
    return SimpleNamespace(
        metrics_dataframe=pd.DataFrame(rows),
        config={"train.lr": 1e-4},
        metrics={"trial_id": "t1", "time_total_s": 10.0},
        error=error,
        path="/sweeps/s/trial_t1",
    )


def test_a_tie_goes_to_the_later_epoch():
    """AP .3, .5, .5, .4 after epochs 1..4: the best is epoch 3, the same score after more training."""
    rows = [{"epochs_done": e, "AP": ap} for e, ap in zip((1, 2, 3, 4), (0.3, 0.5, 0.5, 0.4))]
    s = summarize(result(rows), ["train.lr"], "AP", epochs=4)
    assert s.best["epochs_done"] == 3 and s.best["AP"] == 0.5


def test_a_trial_that_ran_every_epoch_is_done():
    """4 of 4 epochs: done; 3 of 4: stopped early."""
    rows = [{"epochs_done": e, "AP": 0.1 * e} for e in (1, 2, 3, 4)]
    s = summarize(result(rows), ["train.lr"], "AP", epochs=4)
    assert (s.status, s.epochs_run, s.params) == ("done", 4, {"train.lr": 1e-4})
    assert summarize(result(rows[:3]), ["train.lr"], "AP", epochs=4).status == "stopped early"


def test_a_resumed_trials_replayed_epoch_counts_its_last_report():
    """Epoch 2 reported twice (before and after a resume): the later report, AP .6, is the epoch's."""
    rows = [
        {"epochs_done": 1, "AP": 0.3},
        {"epochs_done": 2, "AP": 0.2},
        {"epochs_done": 2, "AP": 0.6},
    ]
    s = summarize(result(rows), ["train.lr"], "AP", epochs=4)
    assert s.best["AP"] == 0.6
    assert s.curve == [(1, 0.3), (2, 0.6)]
