"""Deformable DETR as a library: config, model, losses, post-processing and checkpoints (no Ray, no CLI).

Typical use::

    from core import DetrConfig, build_model
    model, criterion, postprocessor = build_model(DetrConfig())
    outputs = model(images, mask)                      # images (N, 3, H, W), mask (N, H, W) True = padding
    loss = criterion.total_loss(criterion(outputs, targets))

    model, criterion, postprocessor, ckpt = load_checkpoint("r50_deformable_detr-checkpoint.pth")
    detections = Predictor.from_checkpoint("r50_deformable_detr-checkpoint.pth")(image)  # boxes, scores, names

One shape legend across core/ (and ops/), each module restating the letters it uses:
N batch (images), H x W an image, L feature levels, Hl x Wl level l's map, S = sum_l Hl*Wl positions over
all levels, Lq queries, M attention heads, D head dim (d_model = M * D), P sampling points per head and
level, Ld decoder layers, C classes (sigmoid, no background), K target boxes (K_i in image i, ΣK in a
batch), J matched (query, target) pairs. Widths are written out: d_model (the config's hidden_dim),
d_ffn (its dim_feedforward); n_heads is the config's nheads. The config keeps the authors' flag names
so that their checkpoints' args load.
"""

from core.build import build_criterion, build_detector, build_model
from core.checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
)
from core.checkpoint import (
    Checkpoint,
    LoadedModel,
    config_from_authors_args,
    load_checkpoint,
    load_model_weights,
    read_checkpoint,
    save_checkpoint,
)
from core.config import DetrConfig, LossConfig, MatcherConfig, ModelConfig
from core.detector import MLP, DeformableDETR
from core.predictor import Detections, Predictor

__all__ = [
    "CHECKPOINT_FORMAT",
    "MLP",
    "Checkpoint",
    "DeformableDETR",
    "Detections",
    "DetrConfig",
    "LoadedModel",
    "LossConfig",
    "MatcherConfig",
    "ModelConfig",
    "Predictor",
    "build_criterion",
    "build_detector",
    "build_model",
    "config_from_authors_args",
    "load_checkpoint",
    "load_model_weights",
    "read_checkpoint",
    "save_checkpoint",
]
