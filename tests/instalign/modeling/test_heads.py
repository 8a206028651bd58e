"""The prediction heads (``instalign.modeling.heads``): instance aggregation (eq. 8 and its Table 3
variants) and the no-target head's inputs (eq. 10 and Table 3 (c))."""

from __future__ import annotations

import pytest
import torch

from instalign.modeling.heads import EMPTY_LOGIT, InstanceAggregation, NoTargetHead, sentence_feature


def test_aggregation_variants():
    torch.manual_seed(0)
    s, scores = torch.randn(2, 3, 4, 4), torch.tensor([[2.0, -2.0, 0.5], [-3.0, -1.0, -2.0]])
    aia = InstanceAggregation(mode="aia")
    with torch.no_grad():
        aia.prelu.weight.fill_(0.3)
    p = scores.sigmoid()[:, :, None, None]
    torch.testing.assert_close(aia(s, scores), (p * torch.where(s > 0, s, 0.3 * s)).sum(1))  # eq. 8
    torch.testing.assert_close(InstanceAggregation(mode="aia_no_prelu")(s, scores), (p * s).sum(1))
    fixed = InstanceAggregation(mode="fixed_threshold", score_threshold=0.55)(s, scores)
    torch.testing.assert_close(fixed[0], s[0, [0, 2]].amax(0))  # σ(2)=.88, σ(.5)=.62 kept; σ(-2) dropped
    assert (fixed[1] == EMPTY_LOGIT).all()  # nothing kept: "no pixel" everywhere
    with pytest.raises(ValueError):
        InstanceAggregation(mode="mean")


def test_no_target_inputs():
    torch.manual_seed(0)
    q, scores, t = torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    sen = sentence_feature(t, mask)
    torch.testing.assert_close(sen[1], t[1, 0])
    head = NoTargetHead(dim=8, mode="concat")
    q_global = (scores.sigmoid()[..., None] * q).sum(1)  # eq. 10
    torch.testing.assert_close(head(q, scores, t, mask), head.mlp(torch.cat([q_global, sen], -1)).squeeze(-1))
    head = NoTargetHead(dim=8, mode="mean_queries")  # Table 3 (c): the queries' mean alone
    torch.testing.assert_close(head(q, scores, t, mask), head.mlp(q.mean(1)).squeeze(-1))
    torch.testing.assert_close(head(q, scores, torch.randn(2, 4, 8), mask), head(q, scores, t, mask))
    assert NoTargetHead(dim=8, mode="mean_queries").mlp.layers[0].in_features == 8
    assert NoTargetHead(dim=8, mode="q_global").mlp.layers[0].in_features == 8
    assert NoTargetHead(dim=8, mode="t_sen").mlp.layers[0].in_features == 8
