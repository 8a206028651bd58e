"""Prediction heads (paper §3.3–3.6): relevance score, instance masks, AIA, no-target.

* ``PredictionHeads`` — shared by every POT block (deep supervision) and the initial
  queries: ``p̂ = σ(Linear(LN(Q)))`` and the mask embedding ``MLP(LN(Q))`` (3 layers,
  Mask2Former), instance masks ``ŝ = V4 · MLP(Q)ᵀ`` at stride 4 (eq. 4). The LayerNorm is
  Mask2Former's ``decoder_norm``. With ``text_score`` (the ``decoder=mask2former`` row of
  Table 3, whose decoder sees no text) the relevance score is where the expression meets
  the instances: ``logit p̂_i = ⟨W_q LN(Q_i), W_t T_sen⟩ / √C`` with T_sen the sentence
  feature of T0 (eq. 11) — the decoder proposes text-free instances, the score picks the
  referred ones. The paper does not say how its Mask2Former row is made language-aware;
  this is the smallest choice that keeps the whole decoder text-free.
* ``InstanceAggregation`` — Adaptive Instance Aggregation (eq. 8) and its Table 3
  alternatives; returns the *pre-sigmoid* merged map:
  ``aia``: ``Σ_i p̂_i · PReLU(ŝ_i)``; ``aia_no_prelu``: ``Σ_i p̂_i · ŝ_i``;
  ``fixed_threshold``: the union (max of logits) of instances with p̂ > τ, a very
  negative logit where none is kept.
* ``NoTargetHead`` — eqs. 10–12: ``Q_global = Σ_i p̂_i Q_K^i``, ``T_sen`` = mean of T_K
  over real tokens (special tokens included, :func:`sentence_feature`),
  ``MLP([Q_global; T_sen])`` → logit of p̂_nt (2-layer MLP: the paper
  says "MLP"; Mask2Former-style Linear–ReLU–Linear). Table 3 (c) variants: ``q_global`` or
  ``t_sen`` alone, and ``mean_queries`` = ``mean_i Q_K^i`` alone ("average all object
  queries"). With ``decoder=pot`` the queries have read the text in every block, so even
  the inputs without T_sen depend on the expression.

Aggregation and the no-target input run in fp32 (sums over N queries; autocast off).

Letters: B batch, N queries, L tokens, C width, H×W the stride-4 grid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from instalign.config import Aggregation, NoTargetInput

#: "No instance kept" logit of fixed_threshold: σ ≈ 0 and still finite in bf16 and fp16.
EMPTY_LOGIT = -1.0e4


class MLP(nn.Module):
    """Linear layers with ReLU in between (Mask2Former's ``MLP``)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class PredictionHeads(nn.Module):
    """Score and mask heads on the queries of one block (eq. 4; p̂ of §3.3).

    Args:
        dim: C (query width). mask_dim: channels of V4 (= C).
    """

    def __init__(self, *, dim: int, mask_dim: int, text_score: bool = False) -> None:
        super().__init__()
        self.text_score = bool(text_score)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1) if not text_score else None
        self.score_query = nn.Linear(dim, dim) if text_score else None
        self.score_text = nn.Linear(dim, dim) if text_score else None
        self.mask_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=mask_dim, num_layers=3)

    def forward(self, q: Tensor, mask_features: Tensor, sentence: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args: q (B, N, C); mask_features V4 (B, C, H, W); sentence T_sen (B, C), needed iff ``text_score``.

        Returns: ŝ logits (B, N, H, W), p̂ logits (B, N).
        """
        x = self.norm(q)
        if self.text_score:
            if sentence is None:
                raise ValueError("PredictionHeads(text_score=True) needs the sentence feature")
            key = self.score_text(sentence)  # (B, C)
            score_logits = torch.einsum("bnc,bc->bn", self.score_query(x), key) / x.shape[-1] ** 0.5
        else:
            score_logits = self.score(x).squeeze(-1)
        mask_logits = torch.einsum("bnc,bchw->bnhw", self.mask_embed(x), mask_features)  # eq. 4
        return mask_logits, score_logits


class InstanceAggregation(nn.Module):
    """Merged-mask logit from instance masks and relevance scores (eq. 8 and Table 3 variants).

    Args:
        mode: ``aia`` | ``aia_no_prelu`` | ``fixed_threshold``.
        score_threshold: τ of ``fixed_threshold``.
    """

    def __init__(self, *, mode: Aggregation, score_threshold: float = 0.5) -> None:
        super().__init__()
        if mode not in ("aia", "aia_no_prelu", "fixed_threshold"):
            raise ValueError(f"InstanceAggregation: unknown mode {mode!r}")
        self.mode = mode
        self.score_threshold = float(score_threshold)
        # PReLU keeps a learned fraction of each instance's negative evidence (eq. 8)
        self.prelu = nn.PReLU() if mode == "aia" else None

    def forward(self, mask_logits: Tensor, score_logits: Tensor) -> Tensor:
        """Args: mask_logits ŝ (B, N, H, W); score_logits (B, N). Returns: merged logits (B, H, W)."""
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            s, scores = mask_logits.float(), score_logits.float().sigmoid()
            if self.mode == "fixed_threshold":
                keep = (scores > self.score_threshold)[:, :, None, None]
                return s.masked_fill(~keep, EMPTY_LOGIT).amax(dim=1).clamp_min(EMPTY_LOGIT)
            if self.prelu is not None:
                s = self.prelu(s)
            return torch.einsum("bn,bnhw->bhw", scores, s)


def sentence_feature(t: Tensor, text_mask: Tensor) -> Tensor:
    """T_sen (eq. 11): mean of the word features over real tokens.

    Real tokens are the attention mask's: the words and the special tokens ``<s>`` and
    ``</s>`` (for w word tokens they weigh 2/(w+2) of the mean), as ReLA's language masks
    count ``[CLS]``/``[SEP]`` as real. ReLA has no sentence feature; neither uses a pooled
    or CLS feature (docs/model.md, "Where we differ from Mask2Former and ReLA").

    Args: t (B, L, C); text_mask (B, L) bool. Returns: (B, C) in fp32.
    """
    w = text_mask.float()
    return (t.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


class NoTargetHead(nn.Module):
    """p̂_nt logit (eqs. 10–12) with the Table 3 input variants (see module docstring).

    Args:
        dim: C. mode: ``concat`` | ``q_global`` | ``t_sen`` | ``mean_queries``.
    """

    def __init__(self, *, dim: int, mode: NoTargetInput) -> None:
        super().__init__()
        if mode not in ("concat", "q_global", "t_sen", "mean_queries"):
            raise ValueError(f"NoTargetHead: unknown mode {mode!r}")
        self.mode = mode
        in_dim = 2 * dim if mode == "concat" else dim
        self.mlp = MLP(in_dim=in_dim, hidden_dim=dim, out_dim=1, num_layers=2)

    def forward(self, q: Tensor, score_logits: Tensor, t: Tensor, text_mask: Tensor) -> Tensor:
        """Args: Q_K (B, N, C); p̂ logits (B, N); T_K (B, L, C); text_mask (B, L). Returns: (B,) logits."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf = q.float()
            if self.mode == "t_sen":
                parts = [sentence_feature(t, text_mask)]
            elif self.mode == "mean_queries":
                parts = [qf.mean(dim=1)]  # Table 3 (c) "average all object queries", alone
            else:
                q_global = torch.einsum("bn,bnc->bc", score_logits.float().sigmoid(), qf)  # eq. 10
                parts = [q_global, sentence_feature(t, text_mask)] if self.mode == "concat" else [q_global]  # eq. 12
            x = torch.cat(parts, dim=-1)
        return self.mlp(x).squeeze(-1)


__all__ = ["MLP", "PredictionHeads", "InstanceAggregation", "NoTargetHead", "sentence_feature", "EMPTY_LOGIT"]
