"""The sweep config and search space: defaults, validation against the training config, Tune's space, concurrency."""

from __future__ import annotations

import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from ray import tune as ray_tune

from pipelines.job_config import ConfigError, JobConfig
from pipelines.raytrain.preflight import PreflightError
from tune.results import TrialSummary, format_table, table_rows, write_table
from tune.space import BACKBONE_MULT, apply_params
from tune.sweep import main as sweep_main
from tune.sweep_config import load_sweep_config
from tune.tuner import max_concurrent_trials


def test_the_base_configs_preset_is_the_sweeps_unless_base_preset_names_one(tmp_path):
    (tmp_path / "run.json").write_text('{"preset": "tiny", "data": {"root": "/data/shapes"}}')
    cfg, job, _ = load_sweep_config(overrides=[f"base_config={tmp_path / 'run.json'}"])
    assert (job.preset, job.model.hidden_dim, job.data.root, cfg.sweep_name) == (
        "tiny",
        32,
        "/data/shapes",
        "sweep-tiny",
    )
    cfg, job, _ = load_sweep_config(overrides=[f"base_config={tmp_path / 'run.json'}", "base_preset=demo"])
    assert (job.preset, job.model.hidden_dim, cfg.sweep_name) == ("demo", 128, "sweep-demo")
    assert load_sweep_config(overrides=["name=2024"])[0].sweep_name == "2024"  # JSON's number, a name here


def test_default_sweep_searches_the_issue_parameters():
    cfg, job, space = load_sweep_config()
    assert cfg.base_preset == "demo" and job.train.eval_every == 1
    assert set(space.domains) == {
        "train.lr",
        BACKBONE_MULT,
        "train.lr_schedule",
        "train.lr_drop",
        "train.warmup_epochs",
        "model.num_queries",
        "model.enc_n_points",
        "model.dec_n_points",
    }
    assert space.domains["train.lr"].kind == "loguniform"
    assert space.domains["model.num_queries"].values == (100, 300, 900)
    assert space.domains["model.enc_n_points"].values == (2, 4, 8)
    assert set(space.domains["train.lr_schedule"].values) == {"step", "cosine", "warmup_cosine"}
    # Every drop epoch of the default range is inside the default run.
    assert space.domains["train.lr_drop"].values[1] < job.train.epochs
    tune_space = space.tune_param_space()
    assert isinstance(tune_space["train.lr"], ray_tune.search.sample.Float)
    assert isinstance(tune_space["train.lr_drop"], ray_tune.search.sample.Integer)
    assert isinstance(tune_space["model.num_queries"], ray_tune.search.sample.Categorical)


def test_overrides_replace_domains_and_base_fields():
    cfg, job, space = load_sweep_config(
        overrides=[
            'space.model.num_queries={"choice": [100, 300]}',
            "space.model.enc_n_points=null",  # drops a default parameter
            "space.model.dec_layers=3",  # a fixed value for every trial
            "base.train.epochs=8",
            "searcher.kind=optuna",
            "num_trials=4",
        ]
    )
    assert space.domains["model.num_queries"].values == (100, 300)
    assert "model.enc_n_points" not in space.domains
    assert space.fixed == {"model.dec_layers": 3}
    assert job.train.epochs == 8 and cfg.searcher.kind == "optuna" and cfg.num_trials == 4


def test_config_file_replaces_the_default_space(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"space": {"train": {"lr": {"loguniform": [1e-5, 1e-3]}}}, "num_trials": 3}))
    _, _, space = load_sweep_config(path)
    assert list(space.domains) == ["train.lr"]


def test_a_trial_config_derives_the_backbone_lr():
    base = JobConfig().model_dump(mode="json")
    data = apply_params(base, {"train.lr": 1e-3, BACKBONE_MULT: 0.25, "model.num_queries": 100})
    assert data["train"]["lr_backbone"] == pytest.approx(2.5e-4)
    assert data["model"]["num_queries"] == 100
    assert base["model"]["num_queries"] == 300  # the base is not modified


@pytest.mark.parametrize(
    "override, named",
    [
        ('space.model.n_points={"choice": [2, 4]}', "space.model.n_points"),
        ('space.train.learning_rate={"loguniform": [1e-4, 1e-3]}', "space.train.learning_rate"),
        ('space.model.enc_n_points={"choice": [0, 4]}', "space.model.enc_n_points=0"),
        ('space.model.dec_n_points={"int": [0, 4]}', "space.model.dec_n_points=0"),
        ('space.model.num_queries={"choice": [0, 300]}', "space.model.num_queries=0"),
        ('space.train.lr={"uniform": [-1e-3, 1e-3]}', "space.train.lr=-0.001"),
        ('space.train.lr={"loguniform": [0, 1e-3]}', "space.train.lr"),
        ('space.train.lr={"choice": [0.0]}', "space.train.lr=0.0"),
        ('space.train.lr_drop={"int": [2, 9]}', "train.lr_drop=9 is past the last epoch"),
        ('space.train.lr={"loguniform": [1e-3, 1e-4]}', "space.train.lr"),
        ('space.model.nheads={"choice": [8, 5]}', "space.model.nheads=5"),
        ('space.model={"loguniform": [1, 2]}', "space.model"),
        ('space.train.epochs={"choice": [4, 8]}', "space.train.epochs"),
        ("space.train.epochs=8", "space.train.epochs"),
        ('space.train.eval_every={"choice": [1, 2]}', "space.train.eval_every"),
        ("space.train.eval_every=2", "space.train.eval_every"),
        ("base.train.lr=-1", "base training config"),
        ("base.train.eval_every=2", "train.eval_every"),
        ("scheduler.grace_period=9", "scheduler.grace_period"),
        ("num_trials=0", "num_trials"),
        ('space.train.lr={"grid": [1e-4, 1e-3]}', "grid"),  # with optuna (below)
        (
            'space.model.num_queries={"uniform": [50, 300]}',
            "space.model.num_queries: uniform samples floats, but model.num_queries takes integers: use int",
        ),
        ("space.train.lr_backbone_mult=[0.1, 0.4]", "space.train.lr_backbone_mult: multipliers must be numbers"),
        (
            'space.train.lr_drop={"randint": [2, 4]}',
            "space.train.lr_drop: unknown domain 'randint', expected one of loguniform, uniform, int, choice, grid",
        ),
    ],
)
def test_bad_sweeps_fail_naming_the_parameter(override, named):
    extra = ["searcher.kind=optuna"] if "grid" in override else []
    with pytest.raises(ConfigError) as err:
        load_sweep_config(overrides=[override, *extra])
    assert named in str(err.value)


def test_the_command_fails_before_any_trial(tmp_path, capsys):
    code = sweep_main([f"--set=storage_path={tmp_path}", '--set=space.model.num_queries={"choice": [300, 0]}'])
    assert code == 2
    assert "space.model.num_queries=0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no Ray started


def test_concurrency_from_the_cluster():
    _, job, _ = load_sweep_config()  # demo base: 2 CPU workers, 1 decode worker -> 4 CPUs a trial
    assert max_concurrent_trials(job, {"CPU": 16.0}, None, strict=True) == 4
    assert max_concurrent_trials(job, {"CPU": 16.0}, 2, strict=True) == 2
    assert max_concurrent_trials(job, {"CPU": 16.0}, 9, strict=True) == 4  # never more than fit
    assert max_concurrent_trials(job, {"CPU": 16.0}, 9, strict=False) == 9  # a joined cluster may grow
    with pytest.raises(PreflightError, match="one trial needs CPU 4"):
        max_concurrent_trials(job, {"CPU": 3.0}, None, strict=True)
    _, gpu_job, _ = load_sweep_config(overrides=["base.train.use_gpu=true", "base.train.num_workers=2"])
    assert max_concurrent_trials(gpu_job, {"CPU": 64.0, "GPU": 8.0}, None, strict=True) == 4
    assert max_concurrent_trials(gpu_job, {"CPU": 64.0, "GPU": 3.0}, None, strict=True) == 1
    # A searched worker count: the largest trial decides.
    _, job, space = load_sweep_config(overrides=['space.train.num_workers={"choice": [1, 4]}'])
    assert max_concurrent_trials(job, {"CPU": 16.0}, None, strict=True, space=space) == 2  # 4 + 2 CPUs a trial
    # A worker count the space fixes (not searched) decides the same way.
    _, job, space = load_sweep_config(overrides=["space.train.num_workers=4"])
    assert max_concurrent_trials(job, {"CPU": 16.0}, None, strict=True, space=space) == 2
    with pytest.raises(PreflightError, match="one trial needs CPU 6"):
        max_concurrent_trials(job, {"CPU": 5.0}, None, strict=True, space=space)
    # An elastic worker group: planned at its largest.
    _, job, _ = load_sweep_config(overrides=["base.train.num_workers=[1, 3]"])
    assert max_concurrent_trials(job, {"CPU": 16.0}, None, strict=True) == 3  # 3 + 2 CPUs a trial


def test_trials_table_files(tmp_path):
    def summary(tid, lr, ap, epochs_run, status):
        best = {"AP": ap, "AP50": ap * 2, "epochs_done": epochs_run, "checkpoint_path": f"/ckpt/{tid}"}
        return TrialSummary(tid, {"train.lr": lr}, status, best, [(epochs_run, ap)], epochs_run, 12.5)

    summaries = [
        summary("a", 1e-4, 0.10, 2, "stopped early"),
        summary("b", 1e-3, 0.30, 4, "done"),
        TrialSummary("c", {"train.lr": 5e-4}, "error", None, [], 0, None, error="RuntimeError: boom"),
    ]
    rows = table_rows(summaries, "AP")
    assert [r["trial_id"] for r in rows] == ["b", "a", "c"]  # best first, unscored last
    assert rows[1]["stopped_early"] and not rows[0]["stopped_early"]
    uris = write_table(str(tmp_path), rows)
    parquet = pq.read_table(uris[1]).to_pylist()
    csv = pacsv.read_csv(uris[0]).to_pylist()
    assert parquet == rows
    assert [r["trial_id"] for r in csv] == ["b", "a", "c"] and csv[0]["checkpoint"] == "/ckpt/b"
    text = format_table(rows, ["train.lr"])
    assert text.splitlines()[1].split()[:4] == ["b", "0.001", "0.3", "0.6"]

    # Lists, dicts and mixed kinds, as a space may choose among them, are written as their JSON text.
    params = [
        {"data.train_short_sides": [480, 512], "model.num_queries": 100, "x.options": {"a": 1}},
        {"data.train_short_sides": [600], "model.num_queries": "auto", "x.options": None},
    ]
    summaries = [
        TrialSummary(tid, p, "done", {"AP": ap, "epochs_done": 1}, [(1, ap)], 1, 1.0)
        for tid, p, ap in zip("de", params, (0.2, 0.1))
    ]
    parquet = pq.read_table(write_table(str(tmp_path / "lists"), table_rows(summaries, "AP"))[1]).to_pylist()
    assert [(r["data.train_short_sides"], r["model.num_queries"], r["x.options"]) for r in parquet] == [
        ("[480, 512]", "100", '{"a": 1}'),
        ("[600]", '"auto"', None),
    ]


def test_optuna_searcher_draws_from_our_space():
    """The pinned Optuna behind Ray 2.60's OptunaSearch: our domains convert, trials are asked and told."""
    pytest.importorskip("optuna")
    from tune.sweep_config import SweepConfig
    from tune.tuner import _searcher

    _, _, space = load_sweep_config()
    searcher = _searcher(SweepConfig(searcher={"kind": "optuna", "seed": 3}), concurrency=2)
    assert searcher.set_search_properties("AP", "max", space.tune_param_space())
    drawn = [searcher.suggest(f"t{i}") for i in range(2)]
    assert searcher.suggest("t2") is None  # the concurrency cap holds the third back
    for i, params in enumerate(drawn):
        assert 1e-4 <= params["train.lr"] <= 2e-3 and params["model.num_queries"] in (100, 300, 900)
        assert 2 <= params["train.lr_drop"] <= 3 and isinstance(params["train.lr_drop"], int)
        searcher.on_trial_result(f"t{i}", {"AP": 0.1 * i, "training_iteration": 1, "config": params})
        searcher.on_trial_complete(f"t{i}", {"AP": 0.1 * i, "config": params})
    assert searcher.suggest("t3") is not None


def test_a_sweep_directory_resumes_only_its_own_sweep(tmp_path):
    from tune.tuner import SWEEP_CONFIG_FILE, _check_same_sweep

    cfg, _, _ = load_sweep_config(overrides=["num_trials=3", "storage_path=/x/sweeps"])
    assert not _check_same_sweep(str(tmp_path), cfg, restorable=False)  # a new directory
    (tmp_path / SWEEP_CONFIG_FILE).write_text(cfg.model_dump_json())
    assert _check_same_sweep(str(tmp_path), cfg, restorable=True)  # the same command again: resume
    same, _, _ = load_sweep_config(overrides=["num_trials=3", "storage_path=/x/sweeps/"])
    assert _check_same_sweep(str(tmp_path), same, restorable=True)  # the same directory, written otherwise
    other, _, _ = load_sweep_config(overrides=["num_trials=4"])
    with pytest.raises(ConfigError, match="holds another sweep \\(different num_trials\\)"):
        _check_same_sweep(str(tmp_path), other, restorable=True)
    # A sweep that failed before Tune saved its state (a searcher's package missing) is no sweep to keep.
    assert not _check_same_sweep(str(tmp_path), other, restorable=False)
