"""Multi-scale deformable attention (Deformable DETR, as used by Mask2Former's pixel decoder).

DESIGN §1 asks for a pure-PyTorch path that runs on every device. ``ms_deform_attn`` is the
one dispatch point: it picks an implementation by name ("pytorch", or "auto" for the fastest
available one) so that a compiled kernel could be added later behind the same signature,
detected without raising at import and tested equal to the reference (nanochat's attention
fallback pattern; the counterexample is Mask2Former's op that raises at import). Today the
only implementation is the ``grid_sample`` one, so "auto" resolves to it.

Letters: B batch, S flattened multi-scale tokens (Σ H_l·W_l), Q query tokens, M heads,
D channels per head, L levels, P sampling points per head and level.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Union[Sequence[Sequence[int]], Tensor]


def _as_shapes(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    # Python ints keep the split sizes static (no device sync, torch.compile-friendly);
    # a tensor is accepted for signature parity with the CUDA op of Deformable DETR.
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear sampling of every level with ``grid_sample``, then a weighted sum over L·P.

    Args:
        value: (B, S, M, D) projected values of all levels, flattened row-major per level.
        spatial_shapes: L pairs (H_l, W_l).
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y) in [0, 1]; outside is zero-padded.
        attention_weights: (B, Q, M, L, P), summing to 1 over L·P.

    Returns:
        (B, Q, M·D).
    """
    shapes = _as_shapes(spatial_shapes)
    out_dtype = value.dtype
    # Sample in fp32 whatever the autocast dtype: bf16 locations would be off by ~1/4 pixel
    # on a 60×60 level (Mask2Former's CUDA op casts its inputs to fp32 for the same reason).
    value, sampling_locations, attention_weights = value.float(), sampling_locations.float(), attention_weights.float()
    b, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, H·W, M, D) -> (B·M, D, H, W)
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        # (B, Q, M, P, 2) -> (B·M, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # align_corners=False: pixel centres at (i + 0.5) / H, as in Deformable DETR
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B, Q, M, L, P) -> (B·M, 1, Q, L·P)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, num_levels * p)
    # (B·M, D, Q, L, P) -> (B·M, D, Q, L·P), weighted sum over the samples
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(b, m * d, q).transpose(1, 2).contiguous().to(out_dtype)


def small_tensor(data: list, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A tensor of Python numbers on ``device`` without a host sync.

    ``torch.tensor(..., device="cuda")`` copies synchronously (a stream sync every forward);
    a non-blocking copy from pageable memory is staged by the driver and returns at once.
    """
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


#: name -> implementation with the pure-PyTorch signature. A compiled kernel would register
#: here after a guarded import (never raising at import) and need a parity test.
_IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {"pytorch": ms_deform_attn_pytorch}


def available_implementations() -> list[str]:
    return list(_IMPLEMENTATIONS)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Optional[Tensor],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
) -> Tensor:
    """Dispatch point for multi-scale deformable attention (see module docstring).

    ``level_start_index`` is what a flattened-index CUDA kernel needs; the PyTorch path
    derives the split from ``spatial_shapes``. Shapes as ``ms_deform_attn_pytorch``.
    """
    del level_start_index  # only a compiled kernel would read it
    if impl == "auto":
        impl = "pytorch"  # the fastest available: no faster kernel is shipped yet
    try:
        fn = _IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"ms_deform_attn: unknown impl {impl!r}; available: {available_implementations()}") from None
    return fn(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer (Deformable DETR eq. 3; Mask2Former's module).

    Each query predicts, per head, level and point, a 2-D offset around its reference point
    and an attention weight (softmax over L·P); values are projected once per layer.

    Args:
        dim: model width C.
        num_levels: L.
        num_heads: M (C must be divisible by M).
        num_points: P.
        impl: ``ms_deform_attn`` implementation name.
    """

    def __init__(self, *, dim: int, num_levels: int, num_heads: int, num_points: int, impl: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_levels, self.num_heads, self.num_points = dim, num_levels, num_heads, num_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR / Mask2Former init: points start on rays around the reference, one ray per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Attend from ``query`` to the flattened multi-scale ``value_input``.

        Args:
            query: (B, Q, C) queries (with positional embedding added).
            reference_points: (B or 1, Q, L, 2) normalised (x, y) in [0, 1].
            value_input: (B, S, C).
            spatial_shapes: L pairs (H_l, W_l) with Σ H_l·W_l = S.
            level_start_index: (L,) start of each level in S (kernel signature parity).
            padding_mask: (B, S) True where the input is padding (zeroed values).

        Returns:
            (B, Q, C).
        """
        b, q, _ = query.shape
        s = value_input.shape[1]
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, m, self.dim // m)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        # softmax jointly over levels and points, in fp32 (bf16-autocast safe)
        weights = self.attention_weights(query).view(b, q, m, lv * p).float().softmax(-1).view(b, q, m, lv, p)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normalizer = small_tensor([[w, h] for h, w in spatial_shapes], query.device, torch.float32)
        locations = reference_points[:, :, None, :, None, :].float() + offsets.float() / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, impl=self.impl)
        return self.output_proj(out)


__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_pytorch", "available_implementations", "small_tensor"]
