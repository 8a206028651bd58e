"""The InstAlign training objective (paper §3.4–3.7, eqs. 7, 9 and 13; DESIGN §2).

``Criterion(outputs, batch)`` returns a flat dict of named losses whose names double as
MLflow metric names and tunable weights:

* ``loss_merged`` — eq. 9: BCE + dice between the aggregated mask M_merged (its logits,
  upsampled bilinearly from stride 4 to the ground-truth size) and the union of the
  sample's instances. Both terms are means over the batch, so a no-target sample (empty
  union) is pushed toward an empty merged mask; the +1 smoothing of the dice makes
  empty-vs-empty ~0.
* ``loss_nt`` — BCE of the no-target logit p̂_nt (eqs. 10–12) against the label, a mean
  over the batch. ``nt_pos_weight`` weighs the positive (no-target) samples: 1 is the
  paper's plain BCE; ``r = (1 − share) / share`` for a split whose no-target share is
  ``share`` balances the two classes, and the ``tiny`` preset's ``auto`` is √r
  (:func:`balanced_nt_pos_weight`; the paper is silent on class balance; docs/objective.md has the
  measurements).
* ``loss_inst`` — eq. 7, after Hungarian matching (eqs. 5–6, :mod:`.matcher`)::

      L_inst = Σ_matched [λ_score·BCE(p̂_i, 1) + λ_mask·(BCE + dice)(ŝ_i, s_j) + λ_phrase·L_phrase(i)]
             + Σ_unmatched BCE(p̂_i, 0)

  **Normalisation across the batch and the workers.** Every sum runs over all queries of
  all samples of the worker's batch and is divided by ``num_masks``: the number of
  ground-truth instances in the worker's batch, averaged across workers (an
  ``all_reduce`` when ``torch.distributed`` is initialised) and clamped to ≥ 1
  (Mask2Former's normaliser). One divisor for every term keeps the ratio eq. 7 writes
  between them; averaging it across workers makes the gradient independent of how
  instances fall among workers (DDP then averages the workers' gradients).
  With gradient accumulation the engine passes the normaliser of the whole accumulated
  batch (``forward(..., num_masks=, micro_batches=)``; docs/objective.md).
  λ_score weighs only the matched score term; the unmatched term has weight 1, as eq. 7
  writes (no ``eos_coef``-style down-weighting: the paper gives none).

  Logged, unweighted, each already divided by ``num_masks``:

  - ``loss_score``: Σ over matched queries of BCE(p̂_i, 1);
  - ``loss_unmatched``: Σ over unmatched queries of BCE(p̂_i, 0);
  - ``loss_mask`` / ``loss_dice``: point-wise BCE (mean over the points) and smoothed dice
    of each matched pair on importance-sampled points (Mask2Former);
  - ``loss_phrase``: ``L_phrase(i) = 1 − cos(P^i, Q^i)`` (eq. 3) of the matched queries.

  With deep supervision every auxiliary block is matched too (its own assignment, but
  one matcher call for all K blocks, so all are matched at the same uniform points;
  Mask2Former draws fresh points per output) and adds its own eq. 7 loss with equal
  weight. The K supervised predictions are the blocks' outputs: the initial queries'
  prediction, which Mask2Former supervises, gets no loss (docs/model.md, "Where we
  differ from Mask2Former and ReLA"). ``loss_inst`` is the sum and ``loss_inst_<k>`` the
  term of block k (0-based, the final block last). ``loss_score``/``loss_unmatched``/``loss_mask``/
  ``loss_dice``/``loss_phrase`` report the final block's terms.
* ``loss`` — eq. 13: ``λ_merged·L_merged + λ_inst·L_inst + λ_nt·L_nt``, the only entry
  that carries gradient; the others are detached copies for logging.

Table 3's ``instance_supervision``: ``phrase_aligned`` (all of the above), ``vanilla``
(no phrase cost in matching, no ``loss_phrase``), ``none`` (no matching and no
instance keys at all: merged + no-target losses only).

Everything is computed in fp32 with autocast disabled, whatever precision the model ran
in; the blocks' mask logits are read at the points in their own dtype (bf16 under
autocast) and only the samples are upcast. Host synchronisations: the one device→host
copy the Hungarian solver needs (all supervised blocks' costs at once); the matched
indices go back in one non-blocking copy (docs/performance.md, "Host synchronisations").

Letters: B batch, N queries, M instances, R matched pairs, P points, S input side,
H×W the stride-4 mask grid.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from instalign.config import LossConfig
from instalign.data.batch import Batch
from instalign.losses.matcher import HungarianMatcher
from instalign.losses.point_sampling import point_sample, uncertain_points
from instalign.modeling.outputs import BlockPrediction, InstAlignOutput

_SUPERVISION = ("phrase_aligned", "vanilla", "none")


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row smoothed dice loss ``1 - (2·|p∩t| + 1) / (|p| + |t| + 1)``.

    Args:
        logits: (R, P) logits (points or flattened pixels).
        targets: (R, P) targets in [0, 1].

    Returns:
        (R,) losses; ~0 for a confident empty prediction of an empty target.
    """
    probs = logits.sigmoid()
    inter = (probs * targets).sum(-1)
    return 1.0 - (2.0 * inter + 1.0) / (probs.sum(-1) + targets.sum(-1) + 1.0)


def average_num_masks(num_masks: int, device: torch.device) -> Tensor | float:
    """Ground-truth instances per worker, averaged over workers and clamped to ≥ 1.

    Mask2Former's normaliser: every worker divides its summed mask losses by the same
    number, so the gradient does not depend on how instances fall across workers. Stays
    a device tensor under ``torch.distributed`` (no host sync); a float otherwise.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor(float(num_masks), device=device)
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return float(max(num_masks, 1))


class Criterion(nn.Module):
    """Eq. 13 over eqs. 7 (instance), 9 (merged) and the no-target BCE.

    Args:
        matcher: the Hungarian matcher (eqs. 5–6); its weights are the cost weights.
        merged_weight: λ_merged of eq. 13.
        inst_weight: λ_inst of eq. 13.
        nt_weight: λ_nt of eq. 13.
        nt_pos_weight: weight of the no-target (positive) samples in ``loss_nt`` (1: plain BCE).
        score_weight: λ_score of eq. 7.
        mask_weight: λ_mask of eq. 7 (on BCE + dice).
        phrase_weight: λ_phrase of eq. 7 (unused unless ``phrase_aligned``).
        instance_supervision: ``phrase_aligned`` | ``vanilla`` | ``none`` (Table 3).
        deep_supervision: also supervise every auxiliary block (matcher re-run).
        num_points: points per matched pair for the mask loss.
        oversample_ratio: importance-sampling candidates per point (Mask2Former: 3).
        importance_sample_ratio: share of points taken where the mask is uncertain (0.75).
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        merged_weight: float,
        inst_weight: float,
        nt_weight: float,
        score_weight: float,
        mask_weight: float,
        phrase_weight: float,
        instance_supervision: str,
        deep_supervision: bool,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        nt_pos_weight: float = 1.0,
    ):
        super().__init__()
        if nt_pos_weight <= 0:
            raise ValueError(f"Criterion: nt_pos_weight must be > 0, got {nt_pos_weight}")
        if instance_supervision not in _SUPERVISION:
            raise ValueError(f"Criterion: instance_supervision={instance_supervision!r}, "
                             f"expected one of {_SUPERVISION}")
        if instance_supervision != "phrase_aligned" and matcher.phrase_weight:
            raise ValueError(f"Criterion: instance_supervision={instance_supervision!r} matches without the phrase "
                             f"cost, but the matcher has phrase_weight={matcher.phrase_weight}")
        self.matcher = matcher
        self.merged_weight = float(merged_weight)
        self.inst_weight = float(inst_weight)
        self.nt_weight = float(nt_weight)
        self.nt_pos_weight = float(nt_pos_weight)
        self.score_weight = float(score_weight)
        self.mask_weight = float(mask_weight)
        self.phrase_weight = float(phrase_weight)
        self.instance_supervision = instance_supervision
        self.deep_supervision = bool(deep_supervision)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)

    def extra_repr(self) -> str:
        return (f"instance_supervision={self.instance_supervision!r}, deep_supervision={self.deep_supervision}, "
                f"weights(merged={self.merged_weight}, inst={self.inst_weight}, nt={self.nt_weight}, "
                f"nt_pos={self.nt_pos_weight}, "
                f"score={self.score_weight}, mask={self.mask_weight}, phrase={self.phrase_weight})")

    # --- eq. 9 and the no-target BCE ----------------------------------------------------
    @staticmethod
    def merged_loss(merged_logits: Tensor, union_masks: Tensor) -> Tensor:
        """BCE + dice between M_merged (upsampled to the GT size) and the union mask (eq. 9)."""
        target = union_masks.float()  # (B, S, S)
        logits = merged_logits.float()  # (B, H, W)
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits.unsqueeze(1), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False).squeeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = dice_loss(logits.flatten(1), target.flatten(1)).mean()  # (B, S·S) → (B,) → ()
        return bce + dice

    def no_target_loss(self, no_target_logits: Tensor, no_target: Tensor) -> Tensor:
        """BCE of p̂_nt (eq. 12) against the label, positives weighted by ``nt_pos_weight``; mean over B."""
        target = no_target.float()  # (B,)
        pos_weight = None if self.nt_pos_weight == 1.0 else target.new_tensor(self.nt_pos_weight)
        return F.binary_cross_entropy_with_logits(no_target_logits.float(), target, pos_weight=pos_weight)

    # --- eq. 7 for one block --------------------------------------------------------------
    def instance_terms(
        self,
        block: BlockPrediction,
        pairs: tuple[Tensor, Tensor, Tensor],
        instances: Tensor,
        num_masks: Tensor | float,
    ) -> dict[str, Tensor]:
        """Unweighted eq. 7 terms of one block.

        Args:
            block: the block's predictions; its mask logits may be bf16 (only the matched
                ones are upcast).
            pairs: the matched ``(batch, query, instance)`` indices on the device
                (:meth:`HungarianMatcher.pair_indices`).
            instances: (ΣM, S, S) every sample's GT instances, concatenated in batch order.
            num_masks: the cross-worker instance normaliser.
        """
        score_logits = block.score_logits.float()  # (B, N)
        mask_logits = block.mask_logits  # (B, N, H, W), fp32 or bf16: never upcast whole
        batch_idx, pred_idx, gt_idx = pairs

        matched = torch.zeros_like(score_logits, dtype=torch.bool)  # (B, N)
        matched[batch_idx, pred_idx] = True
        # Eq. 7's score terms, summed over queries: BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x).
        terms = {"score": F.softplus(-score_logits).masked_fill(~matched, 0.0).sum() / num_masks,
                 "unmatched": F.softplus(score_logits).masked_fill(matched, 0.0).sum() / num_masks}

        if pred_idx.numel() == 0:
            # Nothing matched (every sample is no-target): zero terms that keep the graph
            # connected, so every input still receives a (zero) gradient.
            zero = mask_logits.sum().float() * 0.0
            terms.update(mask=zero, dice=zero)
            if self.instance_supervision == "phrase_aligned":
                terms["phrase"] = block.phrase_loss.float().sum() * 0.0
            return terms

        # Only the R matched masks are upcast (not all B·N): forward and gradient equal those of
        # upcasting everything first, since each (sample, query) is picked at most once.
        src = mask_logits[batch_idx, pred_idx].float().unsqueeze(1)  # (R, 1, H, W) fp32
        tgt = instances[gt_idx].float().unsqueeze(1)  # (R, 1, S, S)
        coords = uncertain_points(src.detach(), num_points=self.num_points, oversample_ratio=self.oversample_ratio,
                                  importance_sample_ratio=self.importance_sample_ratio)  # (R, P, 2)
        labels = point_sample(tgt, coords)[:, 0]  # (R, P)
        logits = point_sample(src, coords)[:, 0]  # (R, P)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)  # (R,)
        terms["mask"] = bce.sum() / num_masks
        terms["dice"] = dice_loss(logits, labels).sum() / num_masks
        if self.instance_supervision == "phrase_aligned":
            terms["phrase"] = block.phrase_loss.float()[batch_idx, pred_idx].sum() / num_masks
        return terms

    def weighted_instance_loss(self, terms: dict[str, Tensor]) -> Tensor:
        """Eq. 7: λ_score·score + unmatched + λ_mask·(mask + dice) + λ_phrase·phrase."""
        loss = (self.score_weight * terms["score"] + terms["unmatched"]
                + self.mask_weight * (terms["mask"] + terms["dice"]))
        if "phrase" in terms:
            loss = loss + self.phrase_weight * terms["phrase"]
        return loss

    # --- eq. 13 -----------------------------------------------------------------------------
    def forward(self, outputs: InstAlignOutput, batch: Batch, *, num_masks: Tensor | float | None = None,
                micro_batches: int = 1) -> dict[str, Tensor]:
        """All losses of one batch; ``"loss"`` is the eq. 13 total to back-propagate.

        Args:
            num_masks: the eq. 7 normaliser to use instead of this batch's own (instances
                averaged over workers, ≥ 1). Gradient accumulation passes the one of the
                whole accumulated global batch (``engine.train_one_epoch``), so the summed
                micro-batch losses equal the full batch's.
            micro_batches: how many equal micro-batches make up the optimizer step's batch;
                the per-sample means (``loss_merged``, ``loss_nt``) are divided by it, for
                the same reason. 1: a plain batch.
        """
        b = outputs.merged_logits.shape[0]
        if len(batch) != b or len(batch.instance_masks) != b:
            raise ValueError(f"Criterion: outputs are for {b} samples but the batch has {len(batch)} "
                             f"({len(batch.instance_masks)} instance-mask tensors)")
        device = outputs.merged_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            loss_merged = self.merged_loss(outputs.merged_logits, batch.union_masks.to(device))
            loss_nt = self.no_target_loss(outputs.no_target_logits, batch.no_target.to(device))
            if micro_batches != 1:
                loss_merged, loss_nt = loss_merged / micro_batches, loss_nt / micro_batches
            total = self.merged_weight * loss_merged + self.nt_weight * loss_nt
            logged = {"loss_merged": loss_merged, "loss_nt": loss_nt}
            if self.instance_supervision != "none":
                loss_inst, per_block = self._instance_loss(outputs, batch, device, num_masks)
                total = total + self.inst_weight * loss_inst
                logged["loss_inst"] = loss_inst
                logged.update(per_block)
        out = {"loss": total}
        out.update({k: v.detach() for k, v in logged.items()})
        return out

    def _instance_loss(self, outputs: InstAlignOutput, batch: Batch, device: torch.device,
                       num_masks: Tensor | float | None) -> tuple[Tensor, dict[str, Tensor]]:
        blocks = [*outputs.aux, outputs.final] if self.deep_supervision else [outputs.final]
        matches = self.matcher.match_blocks(blocks, batch.instance_masks)  # one host copy for all blocks
        counts = [int(m.shape[0]) for m in batch.instance_masks]
        if num_masks is None:
            num_masks = average_num_masks(sum(counts), device)  # every worker must reach this all_reduce
        pairs = self.matcher.pair_indices(matches, counts, device)  # one copy back for all blocks
        s = batch.union_masks.shape[-1]
        instances = (torch.cat(batch.instance_masks).to(device) if sum(counts)
                     else torch.zeros(0, s, s, dtype=torch.bool, device=device))  # (ΣM, S, S)

        logged: dict[str, Tensor] = {}
        loss_inst = None
        for k, (block, block_pairs) in enumerate(zip(blocks, pairs)):
            terms = self.instance_terms(block, block_pairs, instances, num_masks)
            block_loss = self.weighted_instance_loss(terms)
            loss_inst = block_loss if loss_inst is None else loss_inst + block_loss
            if len(blocks) > 1:
                logged[f"loss_inst_{k}"] = block_loss
        for name, value in terms.items():  # the final block's unweighted terms
            logged[f"loss_{name}"] = value
        return loss_inst, logged


def balanced_nt_pos_weight(samples: int, no_target_samples: int) -> float:
    """``nt_pos_weight = auto``: ``sqrt(targeted / no-target)`` of a train split, to 4 decimals.

    The paper is silent on class balance. Measured on the quickstart's data (19 % no-target,
    ratio r = 4.17; tiny preset, 756 steps; docs/objective.md): the plain BCE (weight 1) never says
    "no target" at the 0.5 threshold within the budget (N-acc 0); full balance (weight r)
    says it too often (N-acc 98, T-acc 56); the geometric mean of the two, √r = 2.04, lands
    between (N-acc 59–73, T-acc 78–85). It only shifts where 0.5 falls on p̂_nt; the
    ranking (AUROC) is the head's own. Rounded to 4 decimals so that the logged value is
    exactly the one trained with. A split without one of the classes has nothing to
    balance: 1 (the plain BCE).
    """
    samples, no_target_samples = int(samples), int(no_target_samples)
    if samples < 0 or not 0 <= no_target_samples <= samples:
        raise ValueError(f"balanced_nt_pos_weight: {no_target_samples} no-target of {samples} samples")
    if no_target_samples in (0, samples):
        return 1.0
    return round(math.sqrt((samples - no_target_samples) / no_target_samples), 4)


def build_criterion(loss_cfg: LossConfig) -> Criterion:
    """Turn the loss config into the matcher and criterion keyword arguments."""
    if loss_cfg.nt_pos_weight == "auto":
        raise ValueError("loss.nt_pos_weight='auto' is worked out from a prepared train split "
                         "(pipelines.training.job.resolve_data_options, instalign.losses.balanced_nt_pos_weight); "
                         "set a number to build the criterion without one")
    phrase_aligned = loss_cfg.instance_supervision == "phrase_aligned"
    matcher = HungarianMatcher(
        score_weight=loss_cfg.score_weight,
        mask_weight=loss_cfg.mask_weight,
        phrase_weight=loss_cfg.phrase_weight if phrase_aligned else 0.0,
        num_points=loss_cfg.num_points,
    )
    return Criterion(
        matcher=matcher,
        merged_weight=loss_cfg.merged_weight,
        inst_weight=loss_cfg.inst_weight,
        nt_weight=loss_cfg.nt_weight,
        nt_pos_weight=loss_cfg.nt_pos_weight,
        score_weight=loss_cfg.score_weight,
        mask_weight=loss_cfg.mask_weight,
        phrase_weight=loss_cfg.phrase_weight,
        instance_supervision=loss_cfg.instance_supervision,
        deep_supervision=loss_cfg.deep_supervision,
        num_points=loss_cfg.num_points,
        oversample_ratio=loss_cfg.oversample_ratio,
        importance_sample_ratio=loss_cfg.importance_sample_ratio,
    )


__all__ = ["Criterion", "average_num_masks", "balanced_nt_pos_weight", "build_criterion", "dice_loss"]
