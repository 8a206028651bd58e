"""Pixel decoder (paper §3.1; Mask2Former's ``MSDeformAttnPixelDecoder``).

The backbone's stride-8/16/32 maps are projected to width C, tagged with a learned level
embedding and a sine position encoding, and refined jointly by ``num_layers`` deformable
self-attention layers (each pixel samples P points per head on every level). An FPN
lateral then brings the stride-4 map in: ``V4`` (mask features, C × H/4 × W/4) for eq. 4,
and ``V1..V3`` (strides 32, 16, 8, coarse to fine) for the Phrase-Object Transformer
blocks in round-robin. Initialisation follows Mask2Former (xavier for projections,
``c2_xavier_fill`` for the FPN convs, Deformable DETR's ray init for the offsets).

Letters: B batch, C width, S flattened tokens of the three levels, H×W a level's size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instalign.modeling.ms_deform_attn import MSDeformAttn, small_tensor
from instalign.modeling.position_encoding import PositionEmbeddingSine


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Mask2Former), or the largest divisor of C below that for toy widths."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_xavier_fill``: Caffe2's XavierFill is kaiming_uniform with a=1."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the flattened levels (Mask2Former)."""

    def __init__(self, *, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int,
                 dropout: float = 0.0, attention_impl: str = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim=dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points,
                                      impl=attention_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Sequence[tuple[int, int]], level_start_index: Tensor) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder with an FPN lateral to stride 4.

    Args:
        in_channels: channels of the backbone maps at strides 4, 8, 16, 32 (from ``feature_info``).
        hidden_dim: C.
        mask_dim: channels of ``V4`` (C in InstAlign: eq. 4 dots it with C-dim mask embeddings).
        num_layers: deformable encoder layers (6 in the paper, 0 disables the encoder).
        num_heads, num_points, ffn_dim: deformable attention heads, points per level, FFN width.
        dropout: inside the encoder layers.
        attention_impl: ``ms_deform_attn`` implementation name: "auto" (a registered kernel where
            available, else "pytorch"), "pytorch" (memory-lean, recomputes the sampling in
            backward) or "reference" (the naive path, for tests).
    """

    def __init__(self, *, in_channels: Sequence[int], hidden_dim: int, mask_dim: int, num_layers: int,
                 num_heads: int, num_points: int, ffn_dim: int, dropout: float = 0.0,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"MSDeformAttnPixelDecoder: need 4 input levels (strides 4..32), got {len(in_channels)}")
        self.num_levels = 3  # strides 32, 16, 8 go through the deformable encoder
        # projections listed coarse → fine, the encoder's token order (Mask2Former)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, hidden_dim, kernel_size=1), group_norm(hidden_dim))
            for ch in reversed(list(in_channels[1:]))
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.activation_checkpointing = False  # set by InstAlign.set_activation_checkpointing
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=hidden_dim // 2)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim=hidden_dim, ffn_dim=ffn_dim, num_levels=self.num_levels, num_heads=num_heads,
                                   num_points=num_points, dropout=dropout, attention_impl=attention_impl)
            for _ in range(num_layers)
        )
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        # The level embedding is only read by the encoder: without one it would get no gradient.
        self.level_embed = nn.Parameter(torch.randn(self.num_levels, hidden_dim)) if num_layers else None
        self.lateral_conv = nn.Sequential(nn.Conv2d(in_channels[0], hidden_dim, 1, bias=False), group_norm(hidden_dim))
        self.output_conv = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False), group_norm(hidden_dim), nn.ReLU()
        )
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, kernel_size=1)
        for conv in (self.lateral_conv[0], self.output_conv[0], self.mask_features):
            c2_xavier_fill(conv)

    @staticmethod
    def reference_points(spatial_shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
        """Pixel centres of every level, normalised to [0, 1]: (1, S, L, 2) as (x, y).

        No padding (all valid ratios 1), so every level sees the same normalised point.
        """
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))  # (H·W, 2)
        ref = torch.cat(refs, 0)  # (S, 2)
        return ref[None, :, None, :].expand(1, -1, len(spatial_shapes), 2)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Refine the backbone maps.

        Args:
            features: 4 maps (B, C_l, H_l, W_l) at strides 4, 8, 16, 32.

        Returns:
            ``V4`` (B, mask_dim, H/4, W/4) and ``[V1, V2, V3]``, each (B, C, H_l, W_l) at
            strides 32, 16, 8.
        """
        coarse_to_fine = list(features[1:])[::-1]
        srcs, poss, shapes = [], [], []
        for lvl, x in enumerate(coarse_to_fine):
            y = self.input_proj[lvl](x)  # (B, C, H, W)
            shapes.append((int(y.shape[-2]), int(y.shape[-1])))
            srcs.append(y.flatten(2).transpose(1, 2))  # (B, H·W, C)
            if self.level_embed is not None:
                poss.append(self.pe_layer(y).flatten(2).transpose(1, 2) + self.level_embed[lvl].to(y.dtype))
        src = torch.cat(srcs, 1)  # (B, S, C)
        if self.layers:
            pos = torch.cat(poss, 1)  # (1, S, C)
            starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
            level_start_index = small_tensor(starts, src.device, torch.long)
            ref = self.reference_points(shapes, src.device)
            recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
            for layer in self.layers:
                if recompute:  # activations recomputed in backward (``InstAlign.set_activation_checkpointing``)
                    src = checkpoint(layer, src, pos, ref, shapes, level_start_index, use_reentrant=False)
                else:
                    src = layer(src, pos, ref, shapes, level_start_index)
        b, _, c = src.shape
        multi_scale = [
            z.transpose(1, 2).reshape(b, c, h, w)  # (B, H·W, C) -> (B, C, H, W)
            for z, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        # FPN lateral: stride-4 map + upsampled stride-8 output (Mask2Former's single FPN level)
        fine = features[0]
        y = self.lateral_conv(fine) + F.interpolate(multi_scale[-1], size=fine.shape[-2:], mode="bilinear",
                                                    align_corners=False)
        y = self.output_conv(y)
        return self.mask_features(y), multi_scale


__all__ = ["MSDeformAttnPixelDecoder", "DeformableEncoderLayer", "group_norm", "c2_xavier_fill"]
