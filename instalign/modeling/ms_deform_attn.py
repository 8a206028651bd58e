"""Multi-scale deformable attention (Deformable DETR, as used by Mask2Former's pixel decoder).

DESIGN §1 asks for a pure-PyTorch path that runs on every device. ``ms_deform_attn`` is the
one dispatch point: it picks an implementation by name so that a compiled kernel can be
added behind the same signature, detected without raising at import and tested equal to the
reference (nanochat's attention fallback pattern; the counterexample is Mask2Former's op that
raises at import). A kernel registers with ``register_ms_deform_attn_impl(name, fn,
available)``; "auto" takes the first registered kernel whose ``available(value)`` is true
for the input's device/dtype and otherwise the lean PyTorch path.

Built-in implementations:

* ``"pytorch"`` — ``ms_deform_attn_pytorch``, the memory-lean path: one level (and
  optionally one query chunk) at a time is sampled, weighted, summed over its P points and
  added into the fp32 output, so the (B·M, D, Q, L·P) stack of all samples never exists.
  When gradients are needed each (level, chunk) piece runs under non-reentrant activation
  checkpointing, so the graph keeps only the op's inputs and the sampling is recomputed in
  backward, one piece at a time. That is what makes it lean in *saved* memory: the weighted
  sum needs the sampled values for the attention weights' gradient, so without recomputation
  the per-level samples add up to the same bytes as the stack (docs/performance.md).
* ``"reference"`` — ``ms_deform_attn_reference``, the naive stack-then-sum path, kept as
  the readable reference for tests and debugging.

Precision: sampling locations and attention weights are always fp32 (bf16 locations move in
steps of ~1/4 pixel on a 60×60 level: 8 significant bits; Mask2Former's CUDA op casts to fp32 too).
``grid_sample`` needs its input and grid in one dtype, so sampling bf16 values in bf16 would
mean a bf16 grid; instead a bf16/fp16 ``value`` is upcast one level (and query chunk) at a
time inside the piece, never the whole tensor at once. Under recomputation that fp32 copy is
transient and the graph keeps ``value`` in its own dtype (without it, ``grid_sample`` keeps
each level's fp32 copy for the locations' gradient). Samples, weights and the sum over
levels and points are fp32; the result is cast back to ``value``'s dtype, so bf16 output
differs from the fp32 reference on the bf16-rounded values by the final rounding only.

Letters: B batch, S flattened multi-scale tokens (Σ H_l·W_l), Q query tokens, M heads,
D channels per head, L levels, P sampling points per head and level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

SpatialShapes = Union[Sequence[Sequence[int]], Tensor]


def _as_shapes(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    # Python ints keep the split sizes static (no device sync, torch.compile-friendly);
    # a tensor is accepted for signature parity with the CUDA op of Deformable DETR.
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The naive path: sample every level with ``grid_sample``, stack, weighted sum over L·P.

    Kept as the reference the lean path and any kernel are tested against. It upcasts the
    whole ``value`` to fp32 and keeps the (B·M, D, Q, L·P) stack for backward (~58 MB per
    image and layer at the paper preset).

    Args:
        value: (B, S, M, D) projected values of all levels, flattened row-major per level.
        spatial_shapes: L pairs (H_l, W_l).
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y) in [0, 1]; outside is zero-padded.
        attention_weights: (B, Q, M, L, P), summing to 1 over L·P.

    Returns:
        (B, Q, M·D) in ``value``'s dtype.
    """
    shapes = _as_shapes(spatial_shapes)
    out_dtype = value.dtype
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


def _level_piece(value: Tensor, locations: Tensor, weights: Tensor, h: int, w: int) -> Tensor:
    """One level for one query chunk, sampled and summed over its P points: (B·M, D, q) in fp32.

    Args:
        value: (B, H·W, M, D) this level's values.
        locations: (B, q, M, P, 2) in [0, 1]; weights: (B, q, M, P).

    Under checkpointing the graph holds these arguments — views of the op's inputs, so no
    new bytes — and every reshape, upcast and grid below is recomputed in backward.
    """
    b, _, m, d = value.shape
    q, p = locations.shape[1], locations.shape[3]
    # (B, H·W, M, D) -> (B·M, D, H, W), upcast for grid_sample (same dtype as the fp32 grid)
    v = value.permute(0, 2, 3, 1).reshape(b * m, d, h, w).float()
    # (B, q, M, P, 2) -> (B·M, q, P, 2) in grid_sample's [-1, 1]; locations stay fp32
    g = (2 * locations.float() - 1).transpose(1, 2).flatten(0, 1)
    # align_corners=False: pixel centres at (i + 0.5) / H, as in Deformable DETR
    sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B·M, D, q, P)
    return (sampled * weights.float().transpose(1, 2).reshape(b * m, 1, q, p)).sum(-1)


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    query_chunk: Optional[int] = None,
    checkpoint: bool = True,
) -> Tensor:
    """Memory-lean multi-scale deformable attention: per-level accumulation, optional query chunks.

    Same shapes and result as ``ms_deform_attn_reference`` (equal to ~1e-7 in fp32).

    Args:
        query_chunk: queries per piece (None: all at once). Bounds the transient
            (B·M, D, chunk, P) sample tensor, in forward and in the backward recompute.
        checkpoint: recompute each piece's sampling in backward instead of keeping the
            samples (``torch.utils.checkpoint``, non-reentrant); only applies when a
            gradient is needed. Saved bytes drop ~6.6× at the paper preset for one extra
            ``grid_sample`` forward per piece.
    """
    shapes = _as_shapes(spatial_shapes)
    b, _, m, d = value.shape
    q = sampling_locations.shape[1]
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"ms_deform_attn_pytorch: query_chunk must be >= 1, got {query_chunk}")
    chunk = query_chunk or max(q, 1)
    recompute = checkpoint and torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, sampling_locations, attention_weights))
    # split/unbind (not slicing): their backward assembles each input's gradient once, where
    # a slice's backward would zero-fill a full-size gradient for every piece
    values = value.split([h * w for h, w in shapes], dim=1)
    chunks = []
    for locs, weights in zip(sampling_locations.split(chunk, dim=1), attention_weights.split(chunk, dim=1)):
        acc: Optional[Tensor] = None
        for v, (h, w), loc, wt in zip(values, shapes, locs.unbind(3), weights.unbind(3)):
            if recompute:
                # grid_sample draws no random numbers: no RNG state to stash and restore
                piece = activation_checkpoint(_level_piece, v, loc, wt, h, w, use_reentrant=False,
                                              preserve_rng_state=False)
            else:
                piece = _level_piece(v, loc, wt, h, w)
            acc = piece if acc is None else acc + piece
        chunks.append(acc)
    if not chunks:  # no queries
        return value.new_zeros(b, 0, m * d)
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)  # (B·M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2).contiguous().to(value.dtype)


def small_tensor(data: list, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A tensor of Python numbers on ``device`` without a host sync.

    ``torch.tensor(..., device="cuda")`` copies synchronously (a stream sync every forward);
    a non-blocking copy from pageable memory is staged by the driver and returns at once.
    """
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


#: The dispatch signature every registered implementation takes.
Implementation = Callable[[Tensor, SpatialShapes, Optional[Tensor], Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _Registered:
    fn: Implementation
    available: Callable[[Tensor], bool]


def _pytorch(value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Optional[Tensor],
             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    del level_start_index  # derived from spatial_shapes
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


def _reference(value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Optional[Tensor],
               sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    del level_start_index
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


def _always(value: Tensor) -> bool:
    return True


#: The two built-ins run everywhere; "auto" never picks them by name, it falls back to "pytorch".
_BUILTIN = {"pytorch": _Registered(_pytorch, _always), "reference": _Registered(_reference, _always)}
#: name -> registered kernel, in registration order (the order "auto" tries them in).
_IMPLEMENTATIONS: dict[str, _Registered] = dict(_BUILTIN)


def register_ms_deform_attn_impl(name: str, fn: Implementation, available: Callable[[Tensor], bool]) -> None:
    """Register a kernel (e.g. a fused CUDA op, after a guarded import that never raises).

    Args:
        name: what ``impl=`` selects it by; not "auto" nor a built-in name.
        fn: called as ``fn(value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights)`` with the shapes of ``ms_deform_attn_reference``
            (``level_start_index`` may be None) and must return (B, Q, M·D) in ``value``'s dtype.
            It needs a parity test against ``ms_deform_attn_reference``.
        available: ``available(value)`` says whether ``fn`` can run on this input (device,
            dtype); "auto" only picks ``fn`` where it is true. Must not raise.
    """
    if name == "auto" or name in _BUILTIN:
        raise ValueError(f"register_ms_deform_attn_impl: {name!r} is reserved")
    _IMPLEMENTATIONS[name] = _Registered(fn, available)


def available_implementations() -> list[str]:
    return list(_IMPLEMENTATIONS)


def resolve_implementation(impl: str, value: Tensor) -> str:
    """The implementation name that ``impl`` means for this input ("auto": first available kernel, else "pytorch")."""
    if impl == "auto":
        kernels = (n for n, r in _IMPLEMENTATIONS.items() if n not in _BUILTIN and r.available(value))
        return next(kernels, "pytorch")
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(f"ms_deform_attn: unknown impl {impl!r}; available: {available_implementations()}")
    if not _IMPLEMENTATIONS[impl].available(value):
        raise ValueError(f"ms_deform_attn: impl {impl!r} cannot run on {value.dtype} tensors on {value.device}; "
                         "use impl='auto' to fall back to the PyTorch path")
    return impl


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

    ``level_start_index`` is what a flattened-index CUDA kernel needs; the PyTorch paths
    derive the split from ``spatial_shapes``. Shapes as ``ms_deform_attn_reference``.
    """
    fn = _IMPLEMENTATIONS[resolve_implementation(impl, value)].fn
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


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


__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_pytorch", "ms_deform_attn_reference",
           "register_ms_deform_attn_impl", "resolve_implementation", "available_implementations", "small_tensor"]
