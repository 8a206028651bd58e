"""Phrase-Object Transformer (paper §3.2–3.3): the POT blocks and Phrase-Object Alignment.

Block k takes the pixel features ``V_k`` of one scale (round-robin coarse → fine, as
Mask2Former), the word features ``T_{k-1}`` and the object queries ``Q_{k-1}``, and runs:

1. masked cross-attention queries → pixels (Mask2Former: pixels where the previous
   prediction's sigmoid < 0.5 are masked; a query with nothing left attends everywhere);
2. bidirectional object–text cross-attention, updating both Q and T (text is enhanced by
   object queries, never by pixels — the paper's memory argument);
3. self-attention over the queries; 4. FFN. Post-norm by default (``pre_norm`` switch).

**Choice for step 2: one shared affinity.** Queries and words are projected once each
(``q_proj``, ``t_proj``); the score ``A = (Q W_q)(T W_t)ᵀ/√d`` is softmax-normalised over
real words for the query update and over queries (Aᵀ) for the word update, with separate
value/output projections per direction (GLIP's ``BiMultiHeadAttention`` shape). Why: the
paper describes *one* layer in which objects and words attend to each other; a shared
affinity makes "which words does this object read" and "which objects does this word
read" the same alignment — the quantity POA then supervises — and costs one projection
pair instead of two. Both directions run through ``scaled_dot_product_attention``.

**POA** (eqs. 1–3), after each block, parameter-free:
``R_k = softmax(Q_k T_kᵀ/√C)`` over the real tokens (the attention mask's: the words and
the special tokens ``<s>``/``</s>``), ``P_k = R_k T_k``,
``L_phrase(i) = 1 − cos(P_k^i, Q_k^i)``; computed in fp32 on the block outputs.

**Table 3 (e), the decoder rows** — what step 2 is (``text_attention``):

* ``object_text`` (``decoder=pot``): the bidirectional step above.
* ``region_language`` (``decoder=rela``): ReLA's Region-Language cross-Attention (Liu et
  al., GRES, CVPR 2023, §4.2): the queries (ReLA's region features) attend to the words and
  are enhanced with what they read; the words are never updated, so T stays T0. ReLA's
  released decoder applies it in its first layer only, to save memory; its paper describes
  it in every layer, as here, so the row differs from POT only in the direction of the
  text exchange.
* ``none`` (``decoder=mask2former``): Mask2Former's decoder, no text at all: the queries,
  the masked attention and the masks never depend on the expression, and T stays T0. Text
  reaches the model only after the decoder (see ``heads.PredictionHeads`` and ``model.py``).

Letters: B batch, N queries, L tokens, C width, M heads, HW flattened pixels of a level.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instalign.modeling.heads import PredictionHeads, sentence_feature
from instalign.modeling.outputs import BlockPrediction
from instalign.modeling.position_encoding import PositionEmbeddingSine


def fallback_unmask(allowed: Tensor) -> Tensor:
    """Let rows with no allowed key attend everywhere (Mask2Former; avoids NaN softmax rows).

    Args:
        allowed: (..., K) bool, True where a key may be attended.
    """
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections over SDPA (bool mask: True = attend)."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, M, n, C/M)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        """Args: query (B, Nq, C), key/value (B or 1, Nk, C), allowed (B, 1|M, Nq, Nk) bool. Returns (B, Nq, C)."""
        b = query.shape[0]
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key).expand(b, -1, -1))
        v = self._heads(self.v_proj(value).expand(b, -1, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, M, Nq, C/M) -> (B, Nq, C)


class ObjectTextAttention(nn.Module):
    """Bidirectional object ↔ word cross-attention from one shared affinity (see module docstring)."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(dim, dim)  # objects' side of the affinity
        self.t_proj = nn.Linear(dim, dim)  # words' side of the affinity
        self.v_text, self.v_obj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_q, self.out_t = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, M, n, C/M)

    def forward(self, q: Tensor, q_pos: Tensor, t: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Args: q, q_pos (B, N, C); t (B, L, C); text_mask (B, L) bool. Returns updates for q and t."""
        p = self.dropout if self.training else 0.0
        qa, ta = self._heads(self.q_proj(q + q_pos)), self._heads(self.t_proj(t))
        words = fallback_unmask(text_mask)[:, None, None, :]  # (B, 1, 1, L)
        # objects read words: softmax of A over real words
        dq = F.scaled_dot_product_attention(qa, ta, self._heads(self.v_text(t)), attn_mask=words, dropout_p=p)
        # words read objects: softmax of Aᵀ over the queries (all real); padded words are updated but never read
        dt = F.scaled_dot_product_attention(ta, qa, self._heads(self.v_obj(q)), dropout_p=p)
        return self.out_q(dq.transpose(1, 2).flatten(2)), self.out_t(dt.transpose(1, 2).flatten(2))


TextAttention = Literal["object_text", "region_language", "none"]


class PhraseObjectBlock(nn.Module):
    """One POT block: masked cross-attn → text step (see module docstring) → self-attn → FFN.

    Args:
        dim: C. num_heads: M. ffn_dim: FFN width. dropout: on attention and residual branches.
        pre_norm: Mask2Former's ``forward_pre`` (LayerNorm before each sublayer) instead of post-norm.
        text_attention: step 2: ``object_text`` (POT), ``region_language`` (ReLA) or ``none``
            (Mask2Former).
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float, pre_norm: bool,
                 text_attention: TextAttention) -> None:
        super().__init__()
        if text_attention not in ("object_text", "region_language", "none"):
            raise ValueError(f"PhraseObjectBlock: unknown text_attention {text_attention!r}")
        self.pre_norm = pre_norm
        self.cross_attn = Attention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm_cross = nn.LayerNorm(dim)
        both = text_attention == "object_text"
        self.object_text = ObjectTextAttention(dim=dim, num_heads=num_heads, dropout=dropout) if both else None
        self.norm_ot_q = nn.LayerNorm(dim) if both else None
        self.norm_ot_t = nn.LayerNorm(dim) if both else None
        one_way = text_attention == "region_language"
        self.region_language = Attention(dim=dim, num_heads=num_heads, dropout=dropout) if one_way else None
        self.norm_rl = nn.LayerNorm(dim) if one_way else None
        self.self_attn = Attention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm_self = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm_ffn = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        for p in self.parameters():  # Mask2Former's decoder layers: xavier on every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, q: Tensor, q_pos: Tensor, memory: Tensor, memory_pos: Tensor, allowed: Tensor,
                t: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            q, q_pos: (B, N, C) queries and their learned positional embedding.
            memory: (B, HW, C) pixels of this block's level; memory_pos (1, HW, C).
            allowed: (B, 1, N, HW) bool attention mask from the previous prediction.
            t: (B, L, C) words; text_mask (B, L) bool.

        Returns:
            Updated q (B, N, C) and t (B, L, C).
        """
        q = self._residual(q, self.norm_cross, lambda x: self.cross_attn(x + q_pos, memory + memory_pos, memory, allowed))
        if self.object_text is not None:
            if self.pre_norm:
                dq, dt = self.object_text(self.norm_ot_q(q), q_pos, self.norm_ot_t(t), text_mask)
                q, t = q + self.drop(dq), t + self.drop(dt)
            else:
                dq, dt = self.object_text(q, q_pos, t, text_mask)
                q, t = self.norm_ot_q(q + self.drop(dq)), self.norm_ot_t(t + self.drop(dt))
        elif self.region_language is not None:
            words = fallback_unmask(text_mask)[:, None, None, :]  # (B, 1, 1, L)
            q = self._residual(q, self.norm_rl, lambda x: self.region_language(x + q_pos, t, t, words))
        q = self._residual(q, self.norm_self, lambda x: self.self_attn(x + q_pos, x + q_pos, x))
        q = self._residual(q, self.norm_ffn, self.ffn)
        return q, t


def phrase_object_alignment(q: Tensor, t: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """POA, eqs. 1–3, in fp32 whatever the autocast dtype.

    Args:
        q: (B, N, C) block output queries Q_k. t: (B, L, C) words T_k. text_mask: (B, L) bool.

    Returns:
        phrase_loss (B, N) = 1 − cos(P^i, Q^i) and phrase_weights R (B, N, L), zero on padding.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, tf = q.float(), t.float()
        logits = qf @ tf.transpose(1, 2) / math.sqrt(qf.shape[-1])  # (B, N, L), eq. 1
        words = fallback_unmask(text_mask)[:, None, :]
        weights = logits.masked_fill(~words, float("-inf")).softmax(dim=-1)
        phrase = weights @ tf  # (B, N, C), eq. 2
        loss = 1.0 - F.cosine_similarity(phrase, qf, dim=-1, eps=1e-6)  # eq. 3
    return loss, weights


class PhraseObjectDecoder(nn.Module):
    """K POT blocks over learned queries, with the shared heads after every block.

    Args:
        blocks: the K ``PhraseObjectBlock`` s.
        heads: ``PredictionHeads`` shared by all blocks (and the initial queries).
        dim: C. num_queries: N. num_levels: scales read in round-robin (≤ 3).
    """

    def __init__(self, *, blocks: Sequence[PhraseObjectBlock], heads: PredictionHeads, dim: int, num_queries: int,
                 num_levels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.heads = heads
        self.num_levels = num_levels
        self.query_feat = nn.Embedding(num_queries, dim)  # learned query features
        self.query_embed = nn.Embedding(num_queries, dim)  # learned query positional embeddings
        self.level_embed = nn.Embedding(num_levels, dim)
        self.pe_layer = PositionEmbeddingSine(num_pos_feats=dim // 2)

    @staticmethod
    def attention_mask(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
        """Mask2Former's masked attention: keep pixels where σ(ŝ) ≥ 0.5 at the level's size.

        Args: mask_logits (B, N, H/4, W/4); size (h, w). Returns: (B, 1, N, h·w) bool, no grad.
        """
        m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        return fallback_unmask(m.flatten(2) >= 0)[:, None]

    def forward(self, multi_scale: Sequence[Tensor], mask_features: Tensor, text: Tensor,
                text_mask: Tensor) -> tuple[list[BlockPrediction], Tensor, Tensor]:
        """Run the K blocks.

        Args:
            multi_scale: pixel-decoder maps (B, C, H_l, W_l), coarse → fine (V1..V3).
            mask_features: V4 (B, C, H/4, W/4).
            text: T0 (B, L, C). text_mask: (B, L) bool.

        Returns:
            One ``BlockPrediction`` per block, Q_K (B, N, C) and T_K (B, L, C).
        """
        b = mask_features.shape[0]
        levels = [multi_scale[i] for i in range(self.num_levels)]
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in levels]
        memory = [x.flatten(2).transpose(1, 2) + self.level_embed.weight[i].to(x.dtype) for i, x in enumerate(levels)]
        memory_pos = [self.pe_layer(x).flatten(2).transpose(1, 2) for x in levels]  # (1, HW, C)
        q = self.query_feat.weight[None].expand(b, -1, -1)  # (B, N, C)
        q_pos = self.query_embed.weight[None].expand(b, -1, -1)
        # Text-conditioned scores (decoder=mask2former) read T0's sentence feature: T is never updated there.
        sentence = sentence_feature(text, text_mask).to(text.dtype) if self.heads.text_score else None  # (B, C)
        # Initial prediction (Q0): only its mask is used, for block 1's attention mask. Unlike
        # Mask2Former it gets no loss: Q0 has seen neither image nor expression (docs/model.md).
        mask_logits, _ = self.heads(q, mask_features, sentence)
        allowed = self.attention_mask(mask_logits, sizes[0])
        t = text
        preds: list[BlockPrediction] = []
        for k, block in enumerate(self.blocks):
            lvl = k % self.num_levels
            q, t = block(q, q_pos, memory[lvl], memory_pos[lvl], allowed, t, text_mask)
            mask_logits, score_logits = self.heads(q, mask_features, sentence)
            phrase_loss, phrase_weights = phrase_object_alignment(q, t, text_mask)
            preds.append(BlockPrediction(mask_logits=mask_logits, score_logits=score_logits,
                                         phrase_loss=phrase_loss, phrase_weights=phrase_weights))
            if k + 1 < len(self.blocks):
                allowed = self.attention_mask(mask_logits, sizes[(k + 1) % self.num_levels])
        return preds, q, t


__all__ = [
    "Attention",
    "ObjectTextAttention",
    "PhraseObjectBlock",
    "PhraseObjectDecoder",
    "TextAttention",
    "phrase_object_alignment",
    "fallback_unmask",
]
