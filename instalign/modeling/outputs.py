"""Typed model outputs (DESIGN §6.5): the same dataclass in train and eval mode.

Letters: B batch, N queries, L tokens, H×W the mask-feature grid (stride 4 of the input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class BlockPrediction:
    """What one Phrase-Object Transformer block predicts (deep supervision reads these)."""

    mask_logits: Tensor  # (B, N, H, W)  ŝ, eq. 4 (logits)
    score_logits: Tensor  # (B, N)  logit of p̂ (sigmoid gives the relevance score)
    phrase_loss: Tensor  # (B, N)  L_phrase(i) = 1 - cos(P^i, Q^i), eq. 3
    phrase_weights: Tensor  # (B, N, L)  R_k, eq. 1 (rows sum to 1 over real tokens)


@dataclass
class InstAlignOutput:
    """Everything the criterion, the metrics and the predictor need.

    ``final`` is block K's prediction; ``aux`` holds blocks 1..K-1 (empty when K = 1; the
    criterion ignores it when deep supervision is off). The initial queries' prediction is
    in neither: unlike Mask2Former it is not supervised (docs/model.md, "Where we differ from Mask2Former and ReLA"). ``merged_logits`` is the pre-sigmoid M_merged of eq. 8
    (for ``aggregation=fixed_threshold`` a logit whose sigmoid is the union of the kept
    instances), ``no_target_logits`` the pre-sigmoid p̂_nt of eq. 12.
    """

    final: BlockPrediction
    merged_logits: Tensor  # (B, H, W)
    no_target_logits: Tensor  # (B,)
    text_mask: Tensor  # (B, L) bool, True for real tokens (<s> and </s> included, not padding)
    aux: list[BlockPrediction] = field(default_factory=list)

    @property
    def mask_logits(self) -> Tensor:
        return self.final.mask_logits

    @property
    def score_logits(self) -> Tensor:
        return self.final.score_logits
