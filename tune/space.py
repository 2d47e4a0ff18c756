"""The search space: parameters named by their training-config field, validated against it, turned into Tune's.

A space is written as nested sections like the training config, each searched field holding one
domain::

    {"train": {"lr": {"loguniform": [1e-4, 2e-3]}, "lr_schedule": {"choice": ["step", "cosine"]}},
     "model": {"num_queries": {"choice": [100, 300, 900]}}}

Domains: ``loguniform`` / ``uniform`` [low, high] (floats), ``int`` [low, high] (both ends included),
``choice`` [values] (sampled), ``grid`` [values] (every value, random searcher only). A plain value
fixes the field for every trial; ``null`` drops a parameter of the default space. One name is not a
training field: ``train.lr_backbone_mult``, the backbone lr as a multiple of the trial's lr.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from typing import Any

from pydantic import BaseModel

from pipelines.job_config import ConfigError, JobConfig, section_model, validate_job_config

DOMAIN_KINDS = ("loguniform", "uniform", "int", "choice", "grid")
BACKBONE_MULT = "train.lr_backbone_mult"  # searched as a multiple of train.lr, written to train.lr_backbone
# Candidate combinations validated together; a larger space is checked one parameter at a time.
MAX_COMBINATIONS = 4096


class SpaceError(ValueError):
    """A search space that cannot run; the message names the parameter (``space.train.lr``)."""


@dataclasses.dataclass(frozen=True)
class Domain:
    """One searched parameter: its kind and its bounds (low, high) or its values."""

    kind: str
    values: tuple[Any, ...]

    @property
    def candidates(self) -> tuple[Any, ...]:
        """The values that validation tries: every choice, or both bounds of a range."""
        return self.values

    def to_tune(self):
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind} {list(self.values)}"
        return f"{self.kind} [{self.values[0]:g}, {self.values[1]:g}]"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Searched parameters and fixed values, keyed by dotted training-config name."""

    domains: dict[str, Domain]
    fixed: dict[str, Any]

    def tune_param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: every name flat, the trial's config holds ``{name: value}``."""
        return {**self.fixed, **{name: d.to_tune() for name, d in self.domains.items()}}

    def num_trials(self, num_samples: int) -> int:
        """Trials Tune runs: each grid domain multiplies the samples."""
        return num_samples * math.prod(len(d.values) for d in self.domains.values() if d.kind == "grid")

    @property
    def uses_grid(self) -> bool:
        return any(d.kind == "grid" for d in self.domains.values())


def _parse_domain(name: str, spec: dict[str, Any]) -> Domain:
    ((kind, raw),) = spec.items()
    where = f"space.{name}"
    if not isinstance(raw, (list, tuple)) or not raw:
        raise SpaceError(f"{where}: {kind} expects a non-empty list, got {raw!r}")
    if kind in ("choice", "grid"):
        return Domain(kind, tuple(raw))
    if len(raw) != 2:
        raise SpaceError(f"{where}: {kind} expects [low, high], got {raw!r}")
    low, high = raw
    numeric = (int,) if kind == "int" else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, numeric) for v in raw):
        kind_of = "integers" if kind == "int" else "numbers"
        raise SpaceError(f"{where}: {kind} bounds must be {kind_of}, got {raw!r}")
    if not low < high:
        raise SpaceError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
    if kind != "int" and not (math.isfinite(low) and math.isfinite(high)):
        raise SpaceError(f"{where}: bounds must be finite, got [{low}, {high}]")
    return Domain(kind, (low, high))


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> ``{dotted name: domain spec dict | fixed value}``; ``null`` entries are dropped."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAIN_KINDS:
            out[name] = value
        elif isinstance(value, dict) and value and not set(value) & set(DOMAIN_KINDS):
            out.update(flatten_space(value, f"{name}."))
        elif isinstance(value, dict):
            raise SpaceError(f"space.{name}: expected one of {list(DOMAIN_KINDS)} as the only key, got {sorted(value)}")
        else:
            out[name] = value
    return out


def check_field_name(name: str) -> Any:
    """The annotation of the training field ``name`` (``model.num_queries``; None for the backbone mult).

    Raises:
        SpaceError: ``name`` is no leaf field of JobConfig.
    """
    if name == BACKBONE_MULT:
        return None
    model: type[BaseModel] | None = JobConfig
    parts = name.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if model is None:  # {"randint": [2, 4]} under a field: a domain misspelled
            raise SpaceError(f"space.{where}: unknown domain {part!r}, expected one of {', '.join(DOMAIN_KINDS)}")
        if part not in model.model_fields:
            known = sorted(model.model_fields)
            raise SpaceError(f"space.{name}: unknown training field {part!r} in {where} (known: {known})")
        annotation = model.model_fields[part].annotation
        sub = section_model(annotation)
        if i + 1 < len(parts):
            model = sub
        elif sub is not None:
            raise SpaceError(f"space.{name}: is a section, not a field; name one of its fields")
    return annotation


def _integers_only(annotation: Any) -> bool:
    """True for a field annotation that holds integers only (``int``, ``int | None``): no float may go there."""
    kinds = {annotation, *typing.get_args(annotation)}
    return int in kinds and float not in kinds


def set_dotted(data: dict[str, Any], name: str, value: Any) -> None:
    """``data[a][b] = value`` for ``name`` "a.b", creating sections (a null section becomes a dict)."""
    *sections, leaf = name.split(".")
    node = data
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def apply_params(job_data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The training config dict of one trial: ``params`` (dotted names) set over a copy of ``job_data``."""
    import copy

    data = copy.deepcopy(job_data)
    for name, value in params.items():
        if name != BACKBONE_MULT:
            set_dotted(data, name, value)
    if BACKBONE_MULT in params:
        data["train"]["lr_backbone"] = data["train"]["lr"] * params[BACKBONE_MULT]
    return data


def check_trial(job: JobConfig, named: set[str]) -> None:
    """The rule a single training run does not enforce but a sweep must: a searched step schedule drops.

    Args:
        named: the space's parameter names; the rule applies when it holds the drop epoch or the schedule.
    """
    t = job.train
    if t.lr_schedule == "step" and named & {"train.lr_drop", "train.lr_schedule"} and t.lr_drop >= t.epochs:
        raise ValueError(
            f"train.lr_drop={t.lr_drop} is past the last epoch (train.epochs={t.epochs}, epochs 0..{t.epochs - 1}): "
            "the step schedule would never drop"
        )


def _validate(base: dict[str, Any], params: dict[str, Any], named: set[str] | None) -> None:
    """Validates one trial's training config; ``named`` None skips the sweep's own rule (check_trial)."""
    job = validate_job_config(apply_params(base, params))
    if named is not None:
        check_trial(job, named)


def parse_space(space: dict[str, Any], base: dict[str, Any]) -> SearchSpace:
    """Parses and validates a space against the base training config, before any trial exists.

    Every name must be a training field; every choice and both bounds of every range must give a
    valid training config with the rest of the base; when the candidates' combinations are few
    (``MAX_COMBINATIONS``), each combination must too.

    Args:
        space: nested sections (module docstring).
        base: the resolved base training config as a JSON dict.

    Raises:
        SpaceError: naming the parameter (``space.model.num_queries=0: ...``).
    """
    flat = flatten_space(space)
    domains: dict[str, Domain] = {}
    fixed: dict[str, Any] = {}
    for name, spec in flat.items():
        annotation = check_field_name(name)
        if isinstance(spec, dict):
            domains[name] = _parse_domain(name, spec)
            kind = domains[name].kind
            if kind in ("uniform", "loguniform") and _integers_only(annotation):
                raise SpaceError(f"space.{name}: {kind} samples floats, but {name} takes integers: use int [low, high]")
        else:
            fixed[name] = spec
        values = domains[name].candidates if name in domains else (spec,)
        if name == BACKBONE_MULT and any(
            isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in values
        ):
            raise SpaceError(f"space.{name}: multipliers must be numbers >= 0, got {spec!r}")
    if BACKBONE_MULT in flat and "train.lr_backbone" in flat:
        raise SpaceError(f"space.{BACKBONE_MULT} and space.train.lr_backbone both set the backbone lr: keep one")
    for name, value in fixed.items():
        try:
            _validate(base, {name: value}, None)
        except (ConfigError, ValueError) as e:
            raise SpaceError(f"space.{name}={value!r}: {e}") from None
    for name, d in domains.items():
        for value in d.candidates:
            try:
                _validate(base, {**fixed, name: value}, None)
            except (ConfigError, ValueError) as e:
                raise SpaceError(f"space.{name}={value!r}: {e}") from None
    # Then the parameters together (rules such as hidden_dim % nheads, or lr_drop < epochs for a step
    # schedule): every combination of candidates when they are few, else each parameter's candidates
    # with the others at their first.
    names = list(domains)
    if math.prod(len(domains[n].candidates) for n in names) <= MAX_COMBINATIONS:
        combos = itertools.product(*(domains[n].candidates for n in names))
    else:
        first = [domains[n].candidates[0] for n in names]
        combos = (
            tuple(v if j == i else first[j] for j in range(len(names)))
            for i, n in enumerate(names)
            for v in domains[n].candidates
        )
    for combo in combos:
        params = dict(zip(names, combo))
        try:
            _validate(base, {**fixed, **params}, set(names) | set(fixed))
        except (ConfigError, ValueError) as e:
            shown = ", ".join(f"space.{n}={v!r}" for n, v in params.items())
            raise SpaceError(f"{e} (with {shown})" if len(names) > 1 else f"{shown}: {e}") from None
    return SearchSpace(domains, fixed)
