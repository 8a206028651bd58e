"""Point sampling for the mask costs and losses (paper §3.4, eqs. 5–7; DESIGN §2).

InstAlign's matcher and instance loss follow Mask2Former: instead of comparing whole
masks, both sides are read at a set of points in normalised image coordinates. The
predicted masks live at stride 4 and the ground truth at the input size; sampling at
normalised coordinates compares them without resizing either.

* the matcher uses ``num_points`` *uniform* points, shared by all queries and all
  instances of an image (:func:`uniform_points`) and — unlike Mask2Former — by all the
  blocks matched in one step;
* the loss uses Mask2Former's *importance sampling* (:func:`uncertain_points`): draw
  ``oversample_ratio × num_points`` uniform candidates, keep the
  ``importance_sample_ratio`` share with the highest uncertainty ``-|logit|`` (the
  points near the predicted boundary) and fill the rest with fresh uniform points.

Coordinates are ``(x, y)`` in ``[0, 1]`` (``grid_sample`` order), letters: P points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly read ``input`` at normalised points.

    ``padding_mode="border"`` deviates from Mask2Former's default zero padding on purpose:
    uniform points in ``[0, 1]`` reach half a pixel beyond the outermost pixel centres,
    and zero padding would blend mask logits there toward 0 (maximal uncertainty, which
    importance sampling then chases) and labels toward background. Replicating the edge
    pixel is what a mask means at its border.

    A low-precision ``input`` (bf16/fp16 mask logits under autocast) is upcast here, one
    map at a time, and read in fp32: ``grid_sample`` needs the points in the input's dtype,
    and bf16 points are off by up to ~2 pixels at 480². Callers pass one block's logits at
    a time, so the K blocks' logits are never all fp32 at once (~1.6 GiB at the paper
    preset); the copy lives only for this call. (Reading the four bilinear corners in
    bf16 and blending in fp32 was measured: it holds more memory than this, since the
    matcher's P = 112² points are as many as the H·W = 120² pixels.)

    Args:
        input: (R, C, H, W) maps to read.
        coords: (R, P, 2) points, ``(x, y)`` in ``[0, 1]``.

    Returns:
        (R, C, P) values at the points: ``input``'s dtype for fp32/fp64, fp32 otherwise.
    """
    if input.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample: expected input (R,C,H,W) and coords (R,P,2), got "
                         f"{tuple(input.shape)} and {tuple(coords.shape)}")
    if input.dtype not in (torch.float32, torch.float64):
        input = input.float()
    grid = 2.0 * coords.to(input.dtype) - 1.0  # [0, 1] → grid_sample's [-1, 1]
    out = F.grid_sample(input, grid.unsqueeze(2), mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(3)  # (R, C, P, 1) → (R, C, P)


def uniform_points(num_rows: int, num_points: int, *, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """(R, P, 2) points drawn uniformly in the unit square (the matcher's shared points)."""
    return torch.rand(num_rows, num_points, 2, device=device, generator=generator)


def uncertainty(logits: Tensor) -> Tensor:
    """Mask2Former's point uncertainty: ``-|logit|``, highest where the prediction is 0.5."""
    return -logits.abs()


@torch.no_grad()
def uncertain_points(
    logits: Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former's importance sampling of points for the mask loss (eq. 7).

    Args:
        logits: (R, 1, H, W) predicted mask logits, one row per matched pair.
        num_points: P, points kept per row.
        oversample_ratio: candidates drawn = ``int(P × oversample_ratio)`` (≥ P).
        importance_sample_ratio: share of P taken from the most uncertain candidates;
            the rest are fresh uniform points (Mask2Former: 0.75).
        generator: optional RNG for reproducible tests.

    Returns:
        (R, P, 2) points in ``[0, 1]``; no gradient (the choice of points is not learned).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"uncertain_points: expected logits (R,1,H,W), got {tuple(logits.shape)}")
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("uncertain_points: need oversample_ratio >= 1 and importance_sample_ratio in [0, 1]")
    rows = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    if num_uncertain == 0:
        return uniform_points(rows, num_points, device=logits.device, generator=generator)
    candidates = uniform_points(rows, num_candidates, device=logits.device, generator=generator)
    # Uncertainty of the (bilinearly interpolated) logit at each candidate.
    scores = uncertainty(point_sample(logits, candidates))[:, 0]  # (R, P_cand)
    top = scores.topk(num_uncertain, dim=1).indices  # (R, P_unc)
    chosen = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))  # (R, P_unc, 2)
    if num_random > 0:
        extra = uniform_points(rows, num_random, device=logits.device, generator=generator)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen


__all__ = ["point_sample", "uniform_points", "uncertainty", "uncertain_points"]
