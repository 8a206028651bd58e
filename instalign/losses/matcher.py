"""Hungarian matching of queries to ground-truth instances (paper §3.4, eqs. 5–6).

For each sample the N predicted instances are assigned one-to-one to its M ground-truth
instances by minimising (eq. 5–6)

    C(i, j) = λ_score·BCE(p̂_i, 1) + λ_mask·(BCE + dice)(ŝ_i, s_j) + λ_phrase·L_phrase(i)

with ``scipy.optimize.linear_sum_assignment``. As in Mask2Former the mask terms are read
at ``num_points`` uniformly sampled points shared by every query and instance of an
image, in fp32 and without gradient. Unlike Mask2Former (fresh points per image in every
matcher call, i.e. per supervised output), :meth:`HungarianMatcher.match_blocks` draws
one set per image for all the blocks it is given, and the criterion gives it all K at
once: every block is matched at the same points (the ground truth is read once; the
blocks' point noise is shared, not independent — docs/model.md, "Where we differ from
Mask2Former and ReLA"). The phrase term (eq. 3) depends on the query only:
it biases matching toward queries whose phrase is already aligned with their object.
``phrase_weight = 0`` gives the ``vanilla`` ablation of Table 3.

All cost matrices of a batch (and of every supervised block) are computed in one batched
pass on the device, padded to the batch's largest M, and copied to the host once; only
the assignment itself loops over samples. A sample with M = 0 (no target) gets an empty
match. With M > N the solver matches N of the instances and the rest stay unmatched.

Letters: K blocks, B batch, N queries, M instances, P points, S input side.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from instalign.losses.point_sampling import point_sample, uniform_points
from instalign.modeling.outputs import BlockPrediction

Match = tuple[Tensor, Tensor]  # (pred_idx, gt_idx), int64 on the CPU, same length


def pairwise_sigmoid_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean point-wise BCE of every prediction against every target.

    Args:
        logits: (B, N, P) predicted mask logits at the points.
        labels: (B, M, P) target values in [0, 1] at the same points.

    Returns:
        (B, N, M) costs.
    """
    # BCE(x, t) = t·softplus(-x) + (1 - t)·softplus(x) = softplus(x) - t·x: one softplus per
    # prediction and one batched matmul over all pairs.
    cost = F.softplus(logits).sum(-1).unsqueeze(-1) - torch.einsum("bnp,bmp->bnm", logits, labels)  # (B, N, M)
    return cost / logits.shape[-1]


def pairwise_dice(logits: Tensor, labels: Tensor) -> Tensor:
    """Mask2Former's smoothed dice loss of every prediction against every target.

    Args:
        logits: (B, N, P) predicted mask logits at the points.
        labels: (B, M, P) target values in [0, 1].

    Returns:
        (B, N, M) costs ``1 - (2·|p∩t| + 1) / (|p| + |t| + 1)``.
    """
    probs = logits.sigmoid()
    inter = torch.einsum("bnp,bmp->bnm", probs, labels)
    total = probs.sum(-1).unsqueeze(2) + labels.sum(-1).unsqueeze(1)  # (B, N, 1) + (B, 1, M)
    return 1.0 - (2.0 * inter + 1.0) / (total + 1.0)


def sample_instance_points(instance_masks: Sequence[Tensor], coords: Tensor) -> Tensor:
    """Read every ground-truth instance at its image's points, padded to the largest M.

    Args:
        instance_masks: B tensors (M_b, S, S), bool or float.
        coords: (B, P, 2) points in [0, 1], one set per image.

    Returns:
        (B, M_max, P) float32 labels; slots past M_b are zero.
    """
    counts = [int(m.shape[0]) for m in instance_masks]
    b, p = coords.shape[0], coords.shape[1]
    m_max = max(counts, default=0)
    if sum(counts) == 0:
        return coords.new_zeros(b, m_max, p, dtype=torch.float32)
    # Each image's instances padded to M_max (zero masks read as zero labels) and read as
    # the channels of one grid_sample: no index tensor, so nothing crosses from the host.
    padded = torch.stack([F.pad(m.to(coords.device).float(), (0, 0, 0, 0, 0, m_max - m.shape[0]))
                          for m in instance_masks])  # (B, M_max, S, S)
    return point_sample(padded, coords.float())  # (B, M_max, P)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to instances minimising the eq. 5–6 cost.

    No parameters and no gradient; an ``nn.Module`` only so it moves and prints with the
    criterion.

    Args:
        score_weight: λ_score on ``BCE(p̂_i, 1)``.
        mask_weight: λ_mask on point-sampled BCE + dice.
        phrase_weight: λ_phrase on ``L_phrase(i)``; 0 for ``instance_supervision=vanilla``.
        num_points: uniform points per image for the mask terms (Mask2Former: 112²).
    """

    def __init__(self, *, score_weight: float, mask_weight: float, phrase_weight: float, num_points: int):
        super().__init__()
        if min(score_weight, mask_weight, phrase_weight) < 0:
            raise ValueError("HungarianMatcher: cost weights must be >= 0")
        if num_points < 1:
            raise ValueError("HungarianMatcher: num_points must be >= 1")
        self.score_weight = float(score_weight)
        self.mask_weight = float(mask_weight)
        self.phrase_weight = float(phrase_weight)
        self.num_points = int(num_points)

    def extra_repr(self) -> str:
        return (f"score_weight={self.score_weight}, mask_weight={self.mask_weight}, "
                f"phrase_weight={self.phrase_weight}, num_points={self.num_points}")

    @torch.no_grad()
    def cost_matrices(
        self,
        blocks: Sequence[BlockPrediction],
        instance_masks: Sequence[Tensor],
        *,
        point_coords: Tensor | None = None,
    ) -> Tensor:
        """The eq. 5–6 cost of every block, sample, query and (padded) instance.

        Args:
            blocks: K block predictions of the same batch (final and/or auxiliary).
            instance_masks: B tensors (M_b, S, S), the ground-truth instances.
            point_coords: (B, P, 2) points to use instead of fresh uniform ones (tests).
                Either way one set per image serves every block.

        Returns:
            (K, B, N, M_max) fp32 costs on the prediction device; columns past M_b are
            padding and must be ignored.
        """
        first = blocks[0].mask_logits
        b, n = first.shape[:2]
        if len(instance_masks) != b:
            raise ValueError(f"HungarianMatcher: {len(instance_masks)} instance-mask tensors for a batch of {b}")
        for i, m in enumerate(instance_masks):
            if m.dim() != 3:
                raise ValueError(f"HungarianMatcher: instance_masks[{i}] must be (M, S, S), got {tuple(m.shape)}")
        m_max = max((int(m.shape[0]) for m in instance_masks), default=0)
        if m_max == 0:
            return first.new_zeros(len(blocks), b, n, 0, dtype=torch.float32)
        # The costs are compared across pairs: keep them in fp32 whatever autocast says.
        with torch.autocast(device_type=first.device.type, enabled=False):
            coords = point_coords if point_coords is not None else uniform_points(b, self.num_points,
                                                                                  device=first.device)
            coords = coords.to(device=first.device, dtype=torch.float32)
            labels = sample_instance_points(instance_masks, coords)  # (B, M_max, P)
            costs = []
            for block in blocks:
                # One block at a time: a bf16 block is upcast inside point_sample and freed
                # before the next, so the K blocks are never fp32 together.
                logits = point_sample(block.mask_logits, coords)  # (B, N, P) fp32
                cost = self.mask_weight * (pairwise_sigmoid_ce(logits, labels) + pairwise_dice(logits, labels))
                per_query = self.score_weight * F.softplus(-block.score_logits.float())  # BCE(p̂, 1), (B, N)
                if self.phrase_weight:
                    per_query = per_query + self.phrase_weight * block.phrase_loss.float()
                costs.append(cost + per_query.unsqueeze(-1))  # (B, N, M_max)
        return torch.stack(costs)

    @torch.no_grad()
    def match_blocks(
        self,
        blocks: Sequence[BlockPrediction],
        instance_masks: Sequence[Tensor],
        *,
        point_coords: Tensor | None = None,
    ) -> list[list[Match]]:
        """Match every block's queries to the instances with one device→host copy.

        Returns:
            K lists of B ``(pred_idx, gt_idx)`` pairs of int64 CPU tensors.
        """
        costs = self.cost_matrices(blocks, instance_masks, point_coords=point_coords).cpu().numpy()
        counts = [int(m.shape[0]) for m in instance_masks]
        out: list[list[Match]] = []
        for k in range(costs.shape[0]):
            per_sample = []
            for i, m in enumerate(counts):
                if m == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    per_sample.append((empty, empty.clone()))
                    continue
                cost = costs[k, i, :, :m]
                if not np.isfinite(cost).all():
                    raise ValueError(f"HungarianMatcher: the cost matrix of sample {i} (block {k}) has NaN/inf "
                                     "entries; the predictions are not finite")
                rows, cols = linear_sum_assignment(cost)
                per_sample.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            out.append(per_sample)
        return out

    @staticmethod
    def pair_indices(matches: Sequence[Sequence[Match]], counts: Sequence[int],
                     device: torch.device | str) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Every block's matched pairs as flat ``(batch, query, instance)`` indices on ``device``.

        Built on the host from the solver's output and moved in ONE copy for all K blocks:
        pinned and non-blocking on CUDA (the host does not wait for it), instead of three
        blocking copies per block. ``instance`` indexes the batch's instances concatenated
        in sample order (``counts[b]`` per sample).

        Returns:
            K triples of (R_k,) int64 tensors (views of one (3, ΣR) device tensor).
        """
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        host, sizes = [], []
        for block in matches:
            empty = torch.empty(0, dtype=torch.int64)
            batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(block)] or [empty])
            pred_idx = torch.cat([src for src, _ in block] or [empty])
            gt_idx = torch.cat([tgt + offsets[i] for i, (_, tgt) in enumerate(block)] or [empty])
            host.append(torch.stack([batch_idx, pred_idx, gt_idx]))
            sizes.append(int(pred_idx.shape[0]))
        flat = torch.cat(host, dim=1)  # (3, ΣR)
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        return [tuple(part.unbind(0)) for part in flat.split(sizes, dim=1)]

    def forward(
        self,
        block: BlockPrediction,
        instance_masks: Sequence[Tensor],
        *,
        point_coords: Tensor | None = None,
    ) -> list[Match]:
        """Match one block's queries: B ``(pred_idx, gt_idx)`` pairs of int64 CPU tensors."""
        return self.match_blocks([block], instance_masks, point_coords=point_coords)[0]


__all__ = ["HungarianMatcher", "Match", "pairwise_dice", "pairwise_sigmoid_ce", "sample_instance_points"]
