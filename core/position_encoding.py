"""Sine position encoding of feature maps, normalized to the valid (unpadded) image area.

Legend: N batch, H x W a feature map, F = num_pos_feats features per axis (2F = d_model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine encoding with the Deformable DETR authors' normalization.

    Positions count valid pixels from the top-left corner, so padding does not shift them; with
    ``normalize`` the count is centred on each pixel (the authors' ``- 0.5``) and divided by the valid
    extent, mapping the image onto [0, scale) on both axes whatever its padded size.

    Args:
        num_pos_feats: F, features per axis; the output has 2F channels (y first, then x).
        temperature: base of the geometric frequency ladder.
        normalize: scale positions by the valid extent (True in Deformable DETR).
        scale: range of normalized positions, 2*pi by default.
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True, scale: float | None = None
    ) -> None:
        super().__init__()
        if num_pos_feats < 2 or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be an even number >= 2, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True; got normalize=False and a scale")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: Tensor) -> Tensor:
        """Encodes every position of a padded batch.

        Args:
            mask: (N, H, W) bool, True at padding.

        Returns:
            (N, 2F, H, W) float32 encoding; channels [0, F) encode y, [F, 2F) encode x.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (N, H, W) 1-based row index among valid rows
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)  # (F,) each frequency twice

        pos_x = x_embed[:, :, :, None] / dim_t  # (N, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin of even and cos of odd features: (N, H, W, F/2, 2) -> (N, H, W, F)
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (N, H, W, 2F) -> (N, 2F, H, W)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, scale={self.scale:.4f}"
