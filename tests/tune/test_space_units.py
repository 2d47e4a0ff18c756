"""The search space and the tuner's driver-side helpers, one function at a time (no Ray cluster)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from pipelines.job_config import ConfigError, JobConfig
from tune.space import Domain, SearchSpace, SpaceError, parse_space
from tune.sweep_config import SweepConfig, load_sweep_config
from tune.tuner import _scheduler, trial_resources, write_outputs


def base(**train):
    """A base training config as a sweep holds it: 4 epochs, a step schedule, ``train`` fields over that."""
    return JobConfig(train={"epochs": 4, "lr_drop": 2, "lr_schedule": "step", **train}).model_dump(mode="json")


def test_an_int_domain_can_draw_its_upper_bound():
    """int [2, 3] draws 3 too: Tune's upper bound is exclusive, so ours is passed one past it."""
    domain = Domain("int", (2, 3)).to_tune()
    assert (domain.lower, domain.upper) == (2, 4)
    assert set(domain.sample(size=200, random_state=0)) == {2, 3}


def test_only_grid_domains_multiply_the_trials():
    """4 trials over a grid of 3 values and a choice of 2: 12 trials (each grid value 4 times)."""
    space = SearchSpace(
        {"train.lr": Domain("grid", (1e-4, 2e-4, 3e-4)), "model.num_queries": Domain("choice", (100, 300))}, {}
    )
    assert space.num_trials(4) == 12
    assert SearchSpace({"model.num_queries": Domain("choice", (100, 300))}, {}).num_trials(4) == 4


def test_a_drop_at_the_last_epochs_end_is_refused():
    """4 epochs (0..3): lr_drop=4 would never drop; the space names that value."""
    with pytest.raises(SpaceError, match="space.train.lr_drop=4") as err:
        parse_space({"train": {"lr_drop": {"int": [2, 4]}}}, base())
    assert "past the last epoch" in str(err.value)
    assert set(parse_space({"train": {"lr_drop": {"int": [2, 3]}}}, base()).domains) == {"train.lr_drop"}


def test_an_empty_range_is_refused():
    """uniform [1e-4, 1e-4] samples one value: use a plain value instead."""
    with pytest.raises(SpaceError, match=r"space.train.lr: uniform needs low < high, got \[0.0001, 0.0001\]"):
        parse_space({"train": {"lr": {"uniform": [1e-4, 1e-4]}}}, base())


def test_a_loguniform_from_zero_is_refused_where_zero_is_a_valid_value():
    """weight_decay 0 is a valid config, but a log scale cannot start at 0."""
    with pytest.raises(SpaceError, match="space.train.weight_decay: loguniform needs low > 0, got 0"):
        parse_space({"train": {"weight_decay": {"loguniform": [0, 1e-3]}}}, base())


def test_a_zero_backbone_multiplier_is_accepted():
    """lr_backbone_mult 0 freezes the backbone, a valid choice; only negatives are refused."""
    space = parse_space({"train": {"lr_backbone_mult": {"choice": [0, 0.1]}}}, base())
    assert space.domains["train.lr_backbone_mult"].values == (0, 0.1)
    with pytest.raises(SpaceError, match="multipliers must be numbers >= 0"):
        parse_space({"train": {"lr_backbone_mult": {"choice": [-0.1, 0.1]}}}, base())


def test_a_loguniform_over_an_integer_field_is_refused():
    """num_queries takes integers: a log-scale float range over it names int as the domain to use."""
    with pytest.raises(SpaceError, match="loguniform samples floats, but model.num_queries takes integers"):
        parse_space({"model": {"num_queries": {"loguniform": [100, 900]}}}, base())


def test_the_largest_worker_count_sizes_every_trial():
    """num_workers choice [4, 1] over a base of 2: a trial holds 4 workers' CPUs plus 2 for decoding."""
    _, job, space = load_sweep_config(overrides=['space={"train": {"num_workers": {"choice": [4, 1]}}}'])
    assert job.train.num_workers == 2 and job.train.cpus_per_worker == 1.0
    assert trial_resources(job, space) == {"CPU": 6.0}


def test_the_best_trial_is_the_highest_ap(tmp_path):
    """Two trials scoring AP 0.2 and 0.5: the 0.5 one is best, and best_trial.json names it."""
    cfg, job, space = load_sweep_config(overrides=['space={"train": {"lr": {"loguniform": [1e-4, 1e-3]}}}'])

    def result(tid, lr, ap):
        df = pd.DataFrame([{"epochs_done": 1, "AP": ap / 2}, {"epochs_done": 2, "AP": ap}])
        return SimpleNamespace(
            metrics_dataframe=df,
            config={"train.lr": lr},
            metrics={"trial_id": tid, "time_total_s": 3.0},
            error=None,
            path=str(tmp_path / f"trial_{tid}"),
        )

    out = write_outputs(str(tmp_path), [result("low", 1e-4, 0.2), result("high", 5e-4, 0.5)], cfg, job, space, False)
    assert out.best.trial_id == "high" and out.best.best["AP"] == 0.5
    assert [r["trial_id"] for r in out.rows] == ["high", "low"]
    assert '"trial_id": "high"' in (tmp_path / "best_trial.json").read_text()
    assert '"lr": 0.0005' in (tmp_path / "best_config.json").read_text()


def test_asha_stops_trials_one_epoch_past_the_last():
    """max_t = epochs + 1: the survivors reach their last epoch's report and write their outputs."""
    assert _scheduler(SweepConfig(), 4)._max_t == 5
    assert _scheduler(SweepConfig(scheduler={"kind": "none"}), 4) is None


def test_a_grace_period_past_the_base_epochs_is_refused():
    """scheduler.grace_period=5 with 4 base epochs: no trial would ever be judged."""
    with pytest.raises(ConfigError, match="scheduler.grace_period=5 is past the base train.epochs=4"):
        load_sweep_config(overrides=["base.train.epochs=4", "scheduler.grace_period=5"])
    cfg, job, _ = load_sweep_config(overrides=["base.train.epochs=4", "scheduler.grace_period=4"])
    assert (cfg.scheduler.grace_period, job.train.epochs) == (4, 4)


def test_a_set_space_replaces_the_default_space():
    """--set space={...} searches only what it names, not the default parameters besides."""
    _, _, space = load_sweep_config(overrides=['space={"train": {"lr": {"loguniform": [1e-4, 1e-3]}}}'])
    assert list(space.domains) == ["train.lr"] and space.fixed == {}
