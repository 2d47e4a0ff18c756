"""The tiny Deformable DETR of the CPU tests: the real architecture and switches, sizes that run in seconds.

Tests import it as ``from tiny import TINY_SIZES, tiny_config`` (pyproject puts ``tests/`` on the path).
"""

from __future__ import annotations

from core import DetrConfig, ModelConfig

# The sizes an authors'-format checkpoint records in its args (no class count there: it is in the head).
TINY_SIZES = dict(
    backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=10
)


def tiny_config(**model) -> DetrConfig:
    """The tiny model with 5 classes; keyword arguments override any ``ModelConfig`` field."""
    return DetrConfig(model=ModelConfig(**{**TINY_SIZES, "num_classes": 5, **model}))
