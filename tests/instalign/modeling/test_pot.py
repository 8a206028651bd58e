"""The phrase-object transformer decoder (``instalign.modeling.pot``): masked attention with its
fallback for a query that predicts nothing, and the phrase-object alignment of eqs. 1-3. How the
text enters each decoder variant is checked on the whole model in ``test_model.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instalign.modeling.pot import Attention, PhraseObjectBlock, PhraseObjectDecoder, fallback_unmask, \
    phrase_object_alignment


def test_masked_attention_and_fully_masked_row_fallback():
    allowed = torch.tensor([[True, False, False], [False, False, False]])
    assert fallback_unmask(allowed).tolist() == [[True, False, False], [True, True, True]]
    # the attention mask from a prediction: σ ≥ 0.5 kept; a query predicting nothing attends everywhere
    logits = torch.full((1, 2, 8, 8), -5.0)
    logits[0, 0, :4, :4] = 5.0  # query 0: top-left quarter
    m = PhraseObjectDecoder.attention_mask(logits, (4, 4))
    assert m.shape == (1, 1, 2, 16)
    assert m[0, 0, 0].view(4, 4)[:2, :2].all() and m[0, 0, 0].sum() == 4
    assert m[0, 0, 1].all()
    # a query allowed one pixel reads exactly that pixel's value
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    q, mem = torch.randn(1, 2, 8), torch.randn(1, 5, 8)
    only = torch.zeros(1, 1, 2, 5, dtype=torch.bool)
    only[..., 0, 3] = True
    out = attn(q, mem, mem, fallback_unmask(only))
    torch.testing.assert_close(out[0, 0], attn.out_proj(attn.v_proj(mem[0, 3])))
    unmasked = attn(q, mem, mem, None)
    torch.testing.assert_close(out[0, 1], unmasked[0, 1])  # the fully masked row attends everywhere
    # a block with every pixel masked for every query stays finite
    none = fallback_unmask(torch.zeros(1, 1, 2, 5, dtype=torch.bool))
    for text_attention in ("object_text", "region_language", "none"):
        block = PhraseObjectBlock(dim=8, num_heads=2, ffn_dim=16, dropout=0.0, pre_norm=False,
                                  text_attention=text_attention)
        qq, tt = block(q, torch.zeros_like(q), mem, torch.zeros_like(mem), none, torch.randn(1, 3, 8),
                       torch.tensor([[True, True, False]]))
        assert torch.isfinite(qq).all() and torch.isfinite(tt).all()
    with pytest.raises(ValueError, match="text_attention"):
        PhraseObjectBlock(dim=8, num_heads=2, ffn_dim=16, dropout=0.0, pre_norm=False, text_attention=True)


def test_phrase_object_alignment_matches_equations():
    torch.manual_seed(0)
    q, t = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss, weights = phrase_object_alignment(q, t, mask)
    for b in range(2):
        real = t[b, mask[b]]
        r = torch.softmax(q[b] @ real.T / math.sqrt(8), dim=-1)  # eq. 1
        p = r @ real  # eq. 2
        torch.testing.assert_close(weights[b][:, mask[b]], r)
        torch.testing.assert_close(loss[b], 1 - F.cosine_similarity(p, q[b], dim=-1))  # eq. 3
        assert (weights[b][:, ~mask[b]] == 0).all()
