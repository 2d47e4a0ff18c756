"""Checkpoints: ours (weights + config JSON, safe to load) and the authors' released ``.pth`` files.

Our format is a dict ``{"format": "ray-deformable-detr/v1", "model": state_dict, "config": JSON
string of DetrConfig, "meta": {...}}`` plus any training state the caller adds (optimizer, scheduler,
scaler, epoch); it loads with ``torch.load(weights_only=True)``.

The authors' format is ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}`` where ``args`` is a
pickled ``argparse.Namespace``, which ``weights_only=True`` refuses by default. We still read it with
``weights_only=True``: the unpickler is allowed that one class name and builds a plain attribute
holder (``AuthorsArgs``) in its place, so nothing from the file runs. A file that needs any other
class falls back to ``weights_only=False`` only when the caller passes ``allow_unsafe_pickle=True``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from core.build import build_model
from core.config import ARCH_FIELDS, DetrConfig, LossConfig, MatcherConfig, ModelConfig
from core.criterion import SetCriterion
from core.detector import DeformableDETR
from core.postprocess import PostProcess

log = logging.getLogger(__name__)

FORMAT = "ray-deformable-detr/v1"
_AUTHORS_ARGS_CLASS = "argparse.Namespace"

_AUTHORS_MODEL_FLAGS = (*ARCH_FIELDS, "dropout", "num_queries", "aux_loss")
_AUTHORS_MATCHER_FLAGS = ("set_cost_class", "set_cost_bbox", "set_cost_giou")
_AUTHORS_LOSS_FLAGS = ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "focal_alpha")


class AuthorsArgs:
    """Stands in for the ``argparse.Namespace`` pickled in the authors' checkpoints: attributes only."""

    def __repr__(self) -> str:
        return f"AuthorsArgs({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


@dataclass
class Checkpoint:
    """A checkpoint read from disk, either format.

    Attributes:
        config: the model/matcher/loss config it was trained with.
        model: the model's state_dict.
        meta: dataset metadata and the like (ours only; empty for the authors').
        extra: every other entry of the file (optimizer, lr_scheduler, epoch, args...).
        source_format: FORMAT for ours, "authors" for the authors' files.
    """

    config: DetrConfig
    model: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source_format: str = FORMAT


class LoadedModel(NamedTuple):
    """What load_checkpoint returns; unpacks like build_model's tuple plus the checkpoint."""

    model: DeformableDETR
    criterion: SetCriterion
    postprocessor: PostProcess
    checkpoint: Checkpoint


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's in a wrapped model's state_dict keys


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    cfg: DetrConfig,
    *,
    meta: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Writes a checkpoint in our format, atomically (a temporary file renamed into place).

    Args:
        path: destination file.
        model: the detector, possibly wrapped by DDP or torch.compile.
        cfg: the config it was built from; stored as JSON.
        meta: JSON-like metadata, e.g. {"category_ids": [...], "category_names": [...]}.
        **extra: more entries, e.g. optimizer=opt.state_dict(), epoch=3; they must be loadable with
            weights_only=True (tensors, numbers, strings, lists, dicts).
    """
    reserved = {"format", "model", "config", "meta"} & extra.keys()
    if reserved:
        raise ValueError(f"extra entries may not use the reserved names {sorted(reserved)}")
    payload = {
        "format": FORMAT,
        "model": _unwrap(model).state_dict(),
        "config": cfg.model_dump_json(),
        "meta": dict(meta or {}),
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    # Mode 0o666 lets the umask decide, as for any new file: mkstemp's 0600 would hide the checkpoint
    # from the other users (and services) of a shared run folder.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download(url: str) -> str:
    """The local copy of an http(s) URL, downloaded once into torch.hub's cache, under its file name after
    a digest of the whole URL (two runs' ``checkpoint.pt`` are two files there).

    Raises:
        OSError: the download failed (urllib's HTTPError and URLError are OSErrors).
    """
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / f"{digest}-{os.path.basename(url.split('?')[0])}"
    if not target.exists():  # download_url_to_file writes a temporary file and renames it: whole or absent
        torch.hub.download_url_to_file(url, str(target), progress=False)
    return str(target)


def _local_file(source: str | os.PathLike) -> str:
    """A local path for ``source``: an existing file, or an http(s) URL's cached download."""
    source = os.fspath(source)
    if source.startswith(("http://", "https://")):
        return download(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    return source


def _torch_load(path: str, map_location: Any, allow_unsafe_pickle: bool) -> Any:
    """torch.load with weights_only=True, letting the authors' pickled Namespace rebuild as AuthorsArgs."""
    try:
        with torch.serialization.safe_globals([(AuthorsArgs, _AUTHORS_ARGS_CLASS)]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_unsafe_pickle:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{path} cannot be loaded with weights_only=True, as our checkpoints and the authors' can "
                f"({reason}). Pass allow_unsafe_pickle=True only if you trust this file."
            ) from err
    log.warning(
        "unpickling %s with weights_only=False (allow_unsafe_pickle=True): this can run code from the file",
        path,
    )
    return torch.load(path, map_location=map_location, weights_only=False)


def config_from_authors_args(args: Any, state_dict: dict[str, Tensor]) -> DetrConfig:
    """The DetrConfig matching an authors' checkpoint.

    Args:
        args: the checkpoint's ``args`` (argparse.Namespace, AuthorsArgs or a dict); flags it lacks
            keep our (the paper's) defaults.
        state_dict: the checkpoint's weights; the number of classes is read from the class head,
            since the authors derive it from the dataset name rather than a flag.
    """
    values = dict(args) if isinstance(args, dict) else dict(vars(args))
    if values.get("masks", False):
        raise ValueError("args.masks=True: segmentation checkpoints are not supported")
    if values.get("position_embedding", "sine") not in ("sine", "v2"):
        raise ValueError(f"args.position_embedding must be 'sine', got {values['position_embedding']!r}")
    model = {k: values[k] for k in _AUTHORS_MODEL_FLAGS if k in values}
    # The authors' build_position_encoding ignores --position_embedding_scale and always uses 2*pi.
    model["position_embedding_scale"] = 2 * math.pi
    class_key = "class_embed.0.weight"
    if class_key not in state_dict:
        raise ValueError(f"checkpoint weights lack {class_key!r}: not a Deformable DETR state_dict")
    model["num_classes"] = int(state_dict[class_key].shape[0])
    return DetrConfig(
        model=ModelConfig(**model),
        matcher=MatcherConfig(**{k: values[k] for k in _AUTHORS_MATCHER_FLAGS if k in values}),
        loss=LossConfig(**{k: values[k] for k in _AUTHORS_LOSS_FLAGS if k in values}),
    )


def read_checkpoint(
    source: str | os.PathLike, *, map_location: Any = "cpu", allow_unsafe_pickle: bool = False
) -> Checkpoint:
    """Reads either checkpoint format without building a model.

    Args:
        source: local path or http(s) URL.
        map_location: passed to torch.load.
        allow_unsafe_pickle: fall back to weights_only=False for a file that needs more classes than
            argparse.Namespace (e.g. a fork's checkpoint). Never needed for ours or the released ones.

    Returns:
        Checkpoint.
    """
    path = _local_file(source)
    try:
        obj = _torch_load(path, map_location, allow_unsafe_pickle)
    except (OSError, ValueError):
        raise
    except Exception as e:  # a text or empty file: the legacy unpickler's KeyError, EOFError, ...
        raise ValueError(f"{source} is not a checkpoint torch.load can read ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{source} is not a checkpoint: expected a dict with a 'model' entry")
    if obj.get("format") == FORMAT:
        rest = {k: v for k, v in obj.items() if k not in ("format", "model", "config", "meta")}
        return Checkpoint(
            config=_saved_config(obj, source),
            model=obj["model"],
            meta=dict(obj.get("meta") or {}),
            extra=rest,
            source_format=FORMAT,
        )
    if "format" in obj:
        raise ValueError(f"{source} has checkpoint format {obj['format']!r}, expected {FORMAT!r}")
    if "args" not in obj:
        raise ValueError(f"{source} has neither our 'format' entry nor the authors' 'args' entry")
    rest = {k: v for k, v in obj.items() if k != "model"}
    return Checkpoint(
        config=config_from_authors_args(obj["args"], obj["model"]),
        model=obj["model"],
        extra=rest,
        source_format="authors",
    )


def _saved_config(obj: dict[str, Any], source: str | os.PathLike) -> DetrConfig:
    """The DetrConfig of one of our checkpoints; ValueError in one line naming the file and the fields."""
    if not isinstance(obj.get("config"), str | bytes):
        raise ValueError(f"{source} has no config entry (a {FORMAT} checkpoint holds its DetrConfig as JSON)")
    try:
        return DetrConfig.model_validate_json(obj["config"])
    except ValidationError as e:
        fields = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{source} has a config entry this version cannot build ({fields})") from None


def load_model_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Loads weights into the detector; class heads are re-initialized if the class count differs.

    Every other key must match (names and shapes), else this raises. Prefixes added by DDP
    (``module.``) and torch.compile (``_orig_mod.``) are removed first, and profiler counters
    (``*.total_ops``, ``*.total_params``) dropped.

    Args:
        model: a DeformableDETR (possibly wrapped).
        state_dict: weights in the authors' key layout.
    """
    model = _unwrap(model)
    state = {}
    for key, value in state_dict.items():
        if key.endswith(("total_ops", "total_params")):
            continue  # counters a profiler (thop) left in some authors' files; their loader skips them too
        while key.startswith(WRAPPER_PREFIXES):  # either wrapper around the other: compile(DDP(m)), DDP(compile(m))
            key = key.split(".", 1)[1]
        state[key] = value

    class_key = "class_embed.0.weight"
    ckpt_classes = state[class_key].shape[0] if class_key in state else None
    model_classes = model.state_dict()[class_key].shape[0]
    if ckpt_classes is not None and ckpt_classes != model_classes:
        dropped = [k for k in state if k.startswith(("class_embed.", "transformer.decoder.class_embed."))]
        for k in dropped:
            del state[k]
        log.warning(
            "checkpoint has %d classes but the model has %d: class heads re-initialized (%d class_embed tensors not loaded)",
            ckpt_classes,
            model_classes,
            len(dropped),
        )
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("class_embed.", "transformer.decoder.class_embed."))]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}"
            )
        return
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    source: str | os.PathLike,
    cfg: DetrConfig | None = None,
    *,
    map_location: Any = "cpu",
    allow_unsafe_pickle: bool = False,
) -> LoadedModel:
    """Builds the model of a checkpoint (either format) and loads its weights.

    Args:
        source: local path or http(s) URL.
        cfg: build from this config instead of the checkpoint's (fine-tuning). Architecture fields
            must agree with the checkpoint; a different num_classes re-initializes the class heads.
        map_location: passed to torch.load; the model is built on the CPU either way.
        allow_unsafe_pickle: see read_checkpoint.

    Returns:
        LoadedModel(model, criterion, postprocessor, checkpoint); the model is in train mode.
    """
    ckpt = read_checkpoint(source, map_location=map_location, allow_unsafe_pickle=allow_unsafe_pickle)
    if cfg is None:
        cfg = ckpt.config
    else:
        differ = ckpt.config.model.architecture_differences(cfg.model, ("checkpoint", "config"))
        if differ:
            raise ValueError("config does not match the checkpoint's architecture: " + "; ".join(differ))
    # The checkpoint overwrites the backbone, so do not fetch ImageNet weights first.
    model, criterion, postprocessor = build_model(cfg, load_backbone_weights=False)
    load_model_weights(model, ckpt.model)
    log.info("loaded %s checkpoint %s (%s)", ckpt.source_format, os.fspath(source), cfg.variant())
    return LoadedModel(model, criterion, postprocessor, ckpt)
