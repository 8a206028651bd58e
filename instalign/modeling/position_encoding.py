"""Sine positional encoding of feature maps (DETR / Mask2Former ``PositionEmbeddingSine``).

Used by the pixel decoder (deformable encoder, paper §3.1) and by the Phrase-Object
Transformer's masked cross-attention (keys = pixels + position). Inputs here are never
padded (every image is resized to the same square), so the encoding depends only on the
map size: it is computed from ``H, W`` without a padding mask (no data-dependent shapes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine/cosine encoding: C/2 channels for y, C/2 for x (Mask2Former defaults).

    Args:
        num_pos_feats: channels per axis (C/2).
        temperature: frequency base.
        scale: coordinates are normalised to [0, scale].
    """

    def __init__(self, *, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats={num_pos_feats} must be even (C divisible by 4)")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        """Encoding for the spatial size of ``x``.

        Args:
            x: (B, C', H, W) feature map; only its size, device and dtype are read.

        Returns:
            (1, 2·num_pos_feats, H, W), broadcastable over the batch.
        """
        h, w = x.shape[-2:]
        eps = 1e-6
        y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        # cumulative position of an all-valid mask, normalised to (0, scale]
        y_embed = y_embed / (h + eps) * self.scale
        x_embed = x_embed / (w + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, None] / dim_t  # (W, F)
        pos_y = y_embed[:, None] / dim_t  # (H, F)
        # interleave sin (even) and cos (odd) channels
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=2
        )  # (H, W, 2F)
        return pos.permute(2, 0, 1).unsqueeze(0).to(x.dtype)


__all__ = ["PositionEmbeddingSine"]
