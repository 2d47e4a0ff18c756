"""The run config: ``TrainConfig`` and the top-level ``JobConfig``, presets, files and ``--set`` overrides.

A run's config is built once at the entry point, in this order (later wins):

1. a preset (``demo``, ``tiny``, ``r50``, ``r50_box_refine``, ``r50_two_stage``), ``demo`` by default;
2. a config file, JSON (``.json``) or TOML (``.toml``), holding any subset of the sections
   ``{"model", "matcher", "loss", "data", "train"}`` (a file may name its own preset with a top-level
   ``"preset"`` key);
3. ``--set section.field=value`` overrides; the value is read as JSON when it parses
   (``2e-4``, ``true``, ``[1, 2]``, ``null``) and as a plain string otherwise.

JSON and TOML because both parse with the standard library (no PyYAML dependency; on Python 3.10, which
has no ``tomllib``, with ``tomli``, the package it came from). The configs of a resumed run
(``resume_job_config``) and of an evaluation (``eval_job_config``) are built here too, with the same
single override path (``apply_overrides``).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from core.config import DetrConfig, LossConfig, MatcherConfig, ModelConfig
from pipelines.data.data_config import DataConfig
from pipelines.presets import PRESETS, R50_IMAGENET  # noqa: F401  (part of this module's interface)
from pipelines.storage import absolute, has_scheme, join_uri, read_bytes, split_uri

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli before 3.11 took it in
    import tomli as tomllib

if TYPE_CHECKING:
    from core.checkpoint import Checkpoint

CONFIG_FILE = "config.json"  # the resolved JobConfig, in every run directory


class ConfigError(ValueError):
    """An invalid run config; the message names every bad field (``train.lr: ...``)."""


class FaultInjection(BaseModel):
    """Kills one worker process once, at a given step: how the tests exercise FailureConfig.

    The worker calls ``os._exit(1)``, a real process death that Ray Train must recover from; the
    marker file makes it happen only once across restarts.
    """

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(1, ge=0, description="world rank of the worker that dies")
    global_step: int = Field(ge=0, description="optimizer steps done when it dies (counted across epochs)")
    marker: str = Field(description="file created just before dying; no death when it already exists")


class DemoDataConfig(BaseModel):
    """The generated shapes dataset (pipelines/data/synthetic.py) a preset creates at data.root when absent."""

    model_config = ConfigDict(extra="forbid")

    num_train: int = Field(1000, ge=1)
    num_val: int = Field(100, ge=1)
    num_classes: int = Field(4, ge=1, le=8)
    min_side: int = Field(160, ge=32, description="image sides are drawn from [min_side, max_side]")
    max_side: int = Field(224, ge=32)
    max_objects: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sides(self) -> DemoDataConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side must be <= max_side, got {self.min_side} > {self.max_side}")
        return self


class TrainConfig(BaseModel):
    """Optimization, scaling, evaluation and checkpointing of a run (defaults: the paper's recipe)."""

    # `--set train.name=20240612` parses as a number; inf and nan are no learning rate.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)

    # Schedule and optimizer (the authors' main.py defaults).
    epochs: int = Field(50, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_backbone: float = Field(2e-5, ge=0, description="0 freezes the backbone")
    lr_linear_proj_mult: float = Field(
        0.1, gt=0, description="lr multiplier of the deformable attention's sampling_offsets and reference_points"
    )
    weight_decay: float = Field(1e-4, ge=0)
    clip_max_norm: float = Field(0.1, ge=0, description="gradient clipping max norm; 0 disables clipping")
    lr_schedule: Literal["step", "cosine", "warmup_cosine"] = "step"
    lr_drop: int = Field(
        40, ge=1, description="step schedule: the epoch from which the lr is multiplied by lr_drop_factor"
    )
    lr_drop_factor: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0, description="warmup_cosine: linear warmup length in (fractional) epochs")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine schedules: final lr as a fraction of the initial")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="autocast dtype; auto = bf16 on GPUs, off on CPUs"
    )
    seed: int = Field(42, ge=0)

    # Evaluation.
    eval_every: int = Field(1, ge=0, description="evaluate every this many epochs (and after the last); 0 = never")
    eval_batch_size: int | None = Field(None, ge=1, description="None = data.batch_size_per_worker")
    num_vis_images: int = Field(4, ge=0, description="val images drawn with predicted and true boxes")
    vis_score_threshold: float = Field(0.3, ge=0, le=1)

    # Scaling (Ray Train).
    num_workers: int | tuple[int, int] = Field(
        2,
        description="training workers, or [min, max] for elastic training: the run goes on with as many "
        "workers as the cluster holds between the two (spot nodes lost, added back), the lr scaled to the "
        "live count; train.lr is the lr at max",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0, description="used when use_gpu")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description='more Ray resources per worker, e.g. {"spot": 0.01} to train on the cluster configs\' '
        "spot nodes (cluster/)",
    )
    elastic_resize_interval_s: float = Field(
        60.0, ge=0, description="elastic runs: how often Ray Train looks for room to grow the worker group"
    )

    # Outputs, checkpoints, failures.
    storage_path: str = Field("runs", description="local folder, s3://bucket/prefix or gs://bucket/prefix")
    name: str | None = Field(None, description="run name (a folder under storage_path); None = <preset>-<time>")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = unlimited")
    max_preemption_failures: int = Field(
        -1,
        ge=-1,
        description="restarts after nodes were preempted (spot), counted apart from max_failures; -1 = unlimited",
    )
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept, best by AP (by loss without eval)")
    checkpoint_every_steps: int | None = Field(
        None,
        ge=0,
        description="optimizer steps between mid-epoch checkpoints, besides each epoch's: a reclaimed spot "
        "worker costs its group at most this many steps, and a restart continues at the step after the "
        "checkpoint with the epoch's data order unchanged; also one on a preemption notice. 0 = at epoch "
        "ends only (no preemption checkpoint either); None = about every 10 minutes (the step count from rank 0's median step time after the "
        "first 5 steps, measured again at each restart): a fixed count cannot mean 10 minutes both on a "
        "CPU (seconds a step) and on 8 GPUs (a third of a second)",
    )
    log_every_s: float = Field(10.0, gt=0, description="seconds between progress lines on the driver")
    metrics_every_steps: int = Field(
        1, ge=1, description="one metrics.jsonl line per this many optimizer steps (their losses averaged)"
    )
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers fed the run's metrics on the driver: tensorboard (event files in "
        "<run dir>/tensorboard), mlflow (MLFLOW_TRACKING_URI, else <run dir>/mlflow.db); needs the tracking extra",
    )
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray Train's own log level on the driver console"
    )
    finetune_from: str | None = Field(
        None, description="checkpoint (ours or the authors', local path, http(s), s3:// or gs://) to start from"
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke runs)")
    preflight_timeout_s: float = Field(30.0, gt=0, description="time allowed to reach the data and storage")
    first_step_timeout_s: float = Field(
        120.0,
        ge=0,
        description="seconds without a first training step after which the driver prints what Ray has pending "
        "(tasks, actors, placement groups it cannot place), if anything; 0 = never",
    )
    fault_injection: FaultInjection | None = Field(None, description="tests only: kill one worker once")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 1")
        if high < low:
            raise PydanticCustomError("range", "a [min, max] range needs min <= max")
        return value

    @field_validator("loggers", mode="before")
    @classmethod
    def _loggers(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set train.loggers=tensorboard

    @field_validator("worker_resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        for key, amount in value.items():
            if key in ("CPU", "GPU"):
                raise ValueError(f"{key} is set by cpus_per_worker / gpus_per_worker, not worker_resources")
            if amount <= 0:
                raise ValueError(f"{key}: amounts must be > 0, got {amount}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"name must be a single folder name, got {self.name!r}")
        return self

    @property
    def elastic(self) -> bool:
        """True when num_workers is a [min, max] range (min < max)."""
        return self.min_workers < self.max_workers

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The worker count train.lr and the total batch are given for."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class JobConfig(BaseModel):
    """Everything one training or evaluation run needs; saved in the run directory and in each checkpoint."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preset: str | None = Field(None, description="the preset this config started from (informational)")
    demo_data: DemoDataConfig | None = Field(
        None, description="generate this synthetic dataset at data.root when its annotation files are absent"
    )

    def detr_config(self) -> DetrConfig:
        """The model/matcher/loss part, what ``core.build_model`` takes."""
        return DetrConfig(model=self.model, matcher=self.matcher, loss=self.loss)

    @property
    def total_batch_size(self) -> int:
        """Images per optimizer step across all workers (at max_workers for an elastic run)."""
        return self.train.max_workers * self.data.batch_size_per_worker * self.train.grad_accum_steps


# ---------------------------------------------------------------------------------------------------
# Building a config: preset, file, overrides.


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is JSON when it parses, else a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects section.field=value, got {item!r}")
    path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set key {key!r} has an empty part")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def _refuse_preset_override(overrides: Sequence[str]) -> None:
    for item in overrides:
        if item.partition("=")[0].strip() == "preset":
            raise ConfigError(
                f"--set {item!r}: a preset is chosen by name (--preset, a sweep's base_preset, a config file's "
                '"preset"), before the file and --set apply'
            )


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], *, merge: bool = True) -> dict[str, Any]:
    """``data`` (a partial config dict) with ``--set key=value`` items applied in order; a new dict.

    The one place overrides are applied, by every entry point (train, resume, evaluate, prepare). With
    ``merge``, an object set over a top-level section merges into it as a config file does (``--set
    'model={"num_queries": 50}'`` changes one field, not the preset's whole model); an object set over a
    field (``train.worker_resources``) replaces it, as does every object without ``merge`` (a sweep's
    ``space``).

    Raises:
        ConfigError: bad syntax, or a key that walks into a value (``train.lr.x=1``).
    """
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        if merge and len(path) == 1 and isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            value = deep_merge(node[path[-1]], value)
        node[path[-1]] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A partial config dict from a ``.json`` or ``.toml`` file (local, s3:// or gs://)."""
    path = os.fspath(path)
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from e
    try:
        data = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold an object with sections, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per bad field: ``train.lr: Input should be greater than 0 (got -1)``; a field of several
    accepted forms (``train.num_workers``: a count or a [min, max] range) gets one line for all of them;
    with ``model`` (the class validated), a field it does not have is named with the fields it has."""
    by_field: dict[str, list[str]] = {}
    shown: dict[str, Any] = {}
    for e in err.errors():
        loc = list(e["loc"])
        while loc and isinstance(loc[-1], str) and _is_union_member(loc[-1]):
            loc.pop()  # pydantic's tag for one form of a union: the field is the part before it
        field = ".".join(str(part) for part in loc) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        known = _fields_at(model, loc[:-1]) if e["type"] == "extra_forbidden" and model is not None else []
        if known:
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            section = ".".join(map(str, loc[:-1])) or "the config"
            msg = f"no such field{f' (did you mean {close[0]}?)' if close else ''}; {section} has {', '.join(known)}"
        if msg not in by_field.setdefault(field, []):
            by_field[field].append(msg)
        if e["type"] not in ("missing", "extra_forbidden") and "input" in e and not isinstance(e["input"], dict):
            shown[field] = e["input"]
    lines = []
    for field, msgs in by_field.items():
        text = "; or ".join(msgs)
        if field in shown and not any(f"got {v}" in text for v in (shown[field], repr(shown[field]))):
            text += f" (got {shown[field]!r})"
        lines.append(f"{field}: {text}")
    return "\n".join(lines)


def _is_union_member(part: str) -> bool:
    """``int``, ``tuple[int, int]``, ``function-after[...]``: how pydantic names a union's forms in a location."""
    return "[" in part or part in ("int", "float", "str", "bool", "none", "list", "dict", "tuple")


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic section class behind a field's annotation (``X``, ``X | None``), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    """The field names of the section at ``loc`` in ``model`` (empty where ``loc`` names no section)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = section_model(model.model_fields[part].annotation)
    return sorted(model.model_fields) if model is not None else []


def validate_job_config(data: dict[str, Any]) -> JobConfig:
    """``JobConfig`` from a dict, raising ConfigError with one line per bad field."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid config:\n" + format_validation_error(e, JobConfig)) from None


def load_job_config(
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    preset: str | None = None,
) -> JobConfig:
    """Builds and validates a run config: preset, then file, then ``--set`` overrides.

    Args:
        config_file: JSON or TOML file with any subset of the sections; may name a ``"preset"``.
        overrides: ``"section.field=value"`` strings, applied last.
        preset: preset name; default the file's ``"preset"`` entry, else ``"demo"``.

    Returns:
        The validated JobConfig.

    Raises:
        ConfigError: unknown preset, unreadable file or invalid fields (each named, e.g.
            ``train.lr: Input should be greater than 0``).
    """
    _refuse_preset_override(overrides)
    file_data = read_config_file(config_file) if config_file is not None else {}
    preset = preset or file_data.get("preset") or "demo"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}, expected one of {sorted(PRESETS)}")
    data = deep_merge(PRESETS[preset], file_data)
    data["preset"] = preset
    return validate_job_config(apply_overrides(data, overrides))


def resume_job_config(run: str, overrides: Sequence[str] = ()) -> JobConfig:
    """The config of a stopped run, read from its run directory (local or bucket), with overrides on top.

    The run's ``config.json`` is a complete resolved config: no preset goes under it. Its storage path
    and name are set from ``run`` itself, so a moved run directory still resumes where it lies.

    Raises:
        ConfigError: no readable config.json at ``run``, or invalid fields.
    """
    if not has_scheme(run):  # "runs/x/" names x; ".", from inside the run directory, names it too
        run = os.path.normpath(run)
        run = absolute(run) if os.path.basename(run) in (".", "..") else run
    storage, name = split_uri(run)
    try:
        data = json.loads(read_bytes(join_uri(run, CONFIG_FILE)))
    except FileNotFoundError:
        raise ConfigError(f"--resume {run}: no {CONFIG_FILE} there (is it a run directory?)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {run}: cannot read {CONFIG_FILE}: {e}") from e
    data.setdefault("train", {}).update(storage_path=storage or ".", name=name)
    _refuse_preset_override(overrides)
    job = validate_job_config(apply_overrides(data, overrides))
    # Its checkpoints hold weights and optimizer state of the run's model: another would fail on every worker.
    differ = validate_job_config(data).model.architecture_differences(job.model, ("run", "--set"), with_classes=True)
    if differ:
        raise ConfigError(
            f"--resume {run}: a resumed run keeps its model (start a new run with --set train.finetune_from=<its "
            f"checkpoint> instead): model.{'; model.'.join(differ)}"
        )
    return job


def eval_job_config(
    ckpt: Checkpoint,
    *,
    data_root: str | None = None,
    ann: str | None = None,
    images: str | None = None,
    num_workers: int = 2,
    use_gpu: bool = False,
    batch_size: int | None = None,
    num_vis: int = 4,
    overrides: Sequence[str] = (),
) -> JobConfig:
    """The config of an evaluation: the checkpoint's model, its data settings (ours) and the command line.

    Args:
        ckpt: the loaded checkpoint (``core.checkpoint.read_checkpoint``), ours or the authors'.
        data_root, ann, images: ``data.root``, ``data.val_ann``, ``data.val_images``; any of them set
            means raw files, so a checkpoint's ``data.parquet_dir`` is dropped.
        num_workers, use_gpu, batch_size, num_vis: the evaluation's workers, images per worker batch
            (default ``data.batch_size_per_worker``) and validation images drawn.
        overrides: ``--set`` items, applied last.
    """
    job: dict[str, Any] = {}
    if ckpt.meta.get("job_config"):
        saved = json.loads(ckpt.meta["job_config"])
        job["data"] = saved.get("data", {})
        job["train"] = {"amp": saved.get("train", {}).get("amp", "auto")}
    else:
        # The authors' checkpoints: raw COCO category ids, the paper's evaluation size.
        job["data"] = {"category_ids": "raw"}
    detr = ckpt.config.model_dump(mode="json")
    job.update(model=detr["model"], matcher=detr["matcher"], loss=detr["loss"])
    data = job["data"]
    for key, value in (("root", data_root), ("val_ann", ann), ("val_images", images)):
        if value is not None:
            data[key] = value
    if data_root or ann or images:
        data["parquet_dir"] = None
    train = {"num_workers": num_workers, "use_gpu": use_gpu, "eval_every": 1, "num_vis_images": num_vis}
    train["name"] = "evaluate"
    if batch_size is not None:
        train["eval_batch_size"] = batch_size
    job = validate_job_config(apply_overrides(deep_merge(job, {"train": train}), overrides))
    # A model other than the checkpoint's would not load, or would load with new (random) class heads.
    differ = ckpt.config.model.architecture_differences(job.model, ("checkpoint", "--set"), with_classes=True)
    if differ:
        raise ConfigError(f"evaluation scores the checkpoint's own model: model.{'; model.'.join(differ)}")
    return job
