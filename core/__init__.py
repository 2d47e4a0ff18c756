"""Deformable DETR as a library: config, model, losses, post-processing and checkpoints (no Ray, no CLI).

Typical use::

    from core import DetrConfig, build_model
    model, criterion, postprocessor = build_model(DetrConfig())
    outputs = model(images, mask)                      # images (N, 3, H, W), mask (N, H, W) True = padding
    loss = criterion.total_loss(criterion(outputs, targets))

    model, criterion, postprocessor, ckpt = load_checkpoint("r50_deformable_detr-checkpoint.pth")
    detections = Predictor.from_checkpoint("r50_deformable_detr-checkpoint.pth")(image)  # boxes, scores, names
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
