"""The sweep's config: base training config, search space, searcher, scheduler, trials, storage; validated once.

Built like the training config (defaults, then a JSON or TOML file, then ``--set key=value``) and saved
as ``sweep_config.json`` in the sweep directory, with the resolved base training config beside it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.job_config import (
    PRESETS,
    ConfigError,
    JobConfig,
    apply_overrides,
    format_validation_error,
    load_job_config,
    read_config_file,
)
from tune.space import SearchSpace, SpaceError, parse_space

# The parameters. The lr range spans the paper's 2e-4 and the demo's 5e-4; the drop epoch
# and warmup ranges fit the default sweep's 4 epochs (a longer base needs its own ranges).
DEFAULT_SPACE: dict[str, Any] = {
    "train": {
        "lr": {"loguniform": [1e-4, 2e-3]},
        "lr_backbone_mult": {"choice": [0.1, 0.4]},
        "lr_schedule": {"choice": ["step", "cosine", "warmup_cosine"]},
        "lr_drop": {"int": [2, 3]},
        "warmup_epochs": {"uniform": [0.2, 1.0]},
    },
    "model": {
        "num_queries": {"choice": [100, 300, 900]},
        "enc_n_points": {"choice": [2, 4, 8]},
        "dec_n_points": {"choice": [2, 4, 8]},
    },
}

# The base of the no-argument sweep: the demo preset cut to 4 epochs (a laptop's evening, not its
# week), evaluated every epoch (ASHA needs AP at each rung, the searcher at each report).
DEFAULT_BASE: dict[str, Any] = {"train": {"epochs": 4, "eval_every": 1, "num_vis_images": 0}}


class SearcherConfig(BaseModel):
    """How trials' parameters are drawn."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["random", "optuna"] = Field(
        "random", description="random: Tune's random/grid search; optuna: TPE (needs the `tune` extra)"
    )
    seed: int = Field(0, ge=0)


class SchedulerConfig(BaseModel):
    """Early stopping: ASHA on the metric, its rungs counted in epochs done (not Tune's iterations)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="a trial continues past a rung if in the top 1/this")


class SweepConfig(BaseModel):
    """Everything a sweep needs; saved in the sweep directory."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)  # `--set name=2024` is a name

    base_preset: str | None = Field(
        None, description='training preset the trials start from; None = base_config\'s "preset", else demo'
    )
    base_config: str | None = Field(None, description="training config file (JSON/TOML) applied over the preset")
    base: dict[str, Any] = Field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_BASE)),
        description="training config sections applied last, e.g. {'train': {'epochs': 6}}",
    )
    space: dict[str, Any] = Field(default_factory=lambda: json.loads(json.dumps(DEFAULT_SPACE)))
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: Literal["AP", "AP50"] = Field("AP", description="validation metric maximized")
    num_trials: int = Field(4, ge=1, description="trials sampled (a grid domain multiplies them)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="cap on trials at once; None = as many as the cluster's GPUs (or CPUs) hold"
    )
    storage_path: str = Field("runs", description="local folder, s3://bucket/prefix or gs://bucket/prefix")
    name: str | None = Field(None, description="sweep directory name; None = sweep-<base_preset>")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.base_preset is not None and self.base_preset not in PRESETS:
            raise ValueError(f"base_preset must be one of {sorted(PRESETS)}, got {self.base_preset!r}")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"name must be a single folder name, got {self.name!r}")
        return self

    @property
    def sweep_name(self) -> str:
        # Fixed (no timestamp): the same command finds the same directory and resumes it.
        return self.name or f"sweep-{self.base_preset}"


def _as_overrides(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested sections -> ``section.field=<json>`` strings, for the training config's one loader."""
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items += _as_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def base_job(cfg: SweepConfig) -> JobConfig:
    """The validated base training config of the sweep (preset, file, then ``cfg.base``).

    Raises:
        ConfigError: naming the field, prefixed by where it came from.
    """
    try:
        return load_job_config(cfg.base_config, _as_overrides(cfg.base), cfg.base_preset)
    except ConfigError as e:
        raise ConfigError(f"base training config: {e}") from None


def check_sweep(cfg: SweepConfig, job: JobConfig) -> SearchSpace:
    """The parsed space, after the checks that tie the sweep to its base training config.

    Raises:
        ConfigError: naming the sweep or training field at fault.
    """
    t = job.train
    if t.eval_every != 1:
        raise ConfigError(
            f"base train.eval_every must be 1 in a sweep (the scheduler and searcher read {cfg.metric} after "
            f"every epoch), got {t.eval_every}"
        )
    if cfg.scheduler.kind == "asha" and cfg.scheduler.grace_period > t.epochs:
        raise ConfigError(
            f"scheduler.grace_period={cfg.scheduler.grace_period} is past the base train.epochs={t.epochs}"
        )
    try:
        space = parse_space(cfg.space, job.model_dump(mode="json"))
    except SpaceError as e:
        raise ConfigError(str(e)) from None
    # Searched or fixed in the space, these would leave the trials training past the scheduler's budget
    # or reporting epochs without the metric.
    if "train.epochs" in {*space.domains, *space.fixed}:
        raise ConfigError("space.train.epochs: the epoch budget is the scheduler's; set base.train.epochs instead")
    if "train.eval_every" in {*space.domains, *space.fixed}:
        raise ConfigError(
            f"space.train.eval_every: trials evaluate every epoch (the scheduler and searcher read {cfg.metric}); "
            "leave it out of the space"
        )
    if space.uses_grid and cfg.searcher.kind != "random":
        raise ConfigError(f"space: grid domains need searcher.kind=random, got {cfg.searcher.kind!r}")
    if not space.domains:
        raise ConfigError("space: nothing is searched (every parameter is fixed or null)")
    return space


def validate_sweep_config(data: dict[str, Any]) -> SweepConfig:
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid sweep config:\n" + format_validation_error(e, SweepConfig)) from None


def load_sweep_config(config_file: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Sweep config from defaults, a JSON/TOML file, then ``key=value`` overrides; with its base and space.

    ``--set space.model.num_queries='{"choice": [100, 300]}'`` replaces one domain;
    ``--set base.train.epochs=8`` changes the base training config.

    Returns:
        (SweepConfig, base JobConfig, SearchSpace), all validated.

    Raises:
        ConfigError: one line per bad field, naming it.
    """
    data = read_config_file(config_file) if config_file is not None else {}
    defaults = SweepConfig().model_dump(mode="json")
    # A file's space or base replaces the default one whole: merging would keep default parameters
    # (or ranges tied to the default epochs) the file never asked for.
    data = apply_overrides({**defaults, **data}, overrides, merge=False)
    cfg = validate_sweep_config(data)
    job = base_job(cfg)
    cfg = cfg.model_copy(update={"base_preset": job.preset})  # the one used: named by sweep-<preset>, saved
    return cfg, job, check_sweep(cfg, job)
