"""Hungarian matcher (eqs. 5–6) against an independent cost and a brute-force assignment."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from instalign.losses.matcher import HungarianMatcher
from instalign.modeling.outputs import BlockPrediction

S = 8  # predictions at the GT resolution so pixel-centre points read exact pixel values
WEIGHTS = dict(score_weight=2.0, mask_weight=5.0, phrase_weight=1.0)


def pixel_centre_points(b: int, p: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, 2) points at pixel centres and their (B, P, 2) integer (x, y) pixels."""
    pix = torch.randint(0, S, (b, p, 2), generator=generator)
    return (pix.float() + 0.5) / S, pix


def random_block(b: int, n: int, generator: torch.Generator) -> BlockPrediction:
    return BlockPrediction(
        mask_logits=3 * torch.randn(b, n, S, S, generator=generator),
        score_logits=2 * torch.randn(b, n, generator=generator),
        phrase_loss=torch.rand(b, n, generator=generator),
        phrase_weights=torch.rand(b, n, 3, generator=generator),
    )


def reference_cost(block, instances, pix, *, score_weight, mask_weight, phrase_weight):
    """Eq. 5–6 written out pair by pair, reading pixels directly (no grid_sample)."""
    costs = []
    for b, gt in enumerate(instances):
        xs, ys = pix[b, :, 0], pix[b, :, 1]
        n, m = block.score_logits.shape[1], gt.shape[0]
        cost = torch.zeros(n, m)
        for i in range(n):
            logits = block.mask_logits[b, i, ys, xs]
            score = F.binary_cross_entropy_with_logits(block.score_logits[b, i], torch.tensor(1.0))
            for j in range(m):
                target = gt[j, ys, xs].float()
                bce = F.binary_cross_entropy_with_logits(logits, target)
                prob = logits.sigmoid()
                dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
                cost[i, j] = (score_weight * score + mask_weight * (bce + dice)
                              + phrase_weight * block.phrase_loss[b, i])
        costs.append(cost)
    return costs


def brute_force_min(cost: torch.Tensor) -> float:
    """The optimal one-to-one assignment cost by enumerating every injective map."""
    n, m = cost.shape
    if m <= n:
        return min(sum(cost[perm[j], j].item() for j in range(m)) for perm in itertools.permutations(range(n), m))
    return min(sum(cost[i, perm[i]].item() for i in range(n)) for perm in itertools.permutations(range(m), n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_independent_costs(seed):
    g = torch.Generator().manual_seed(seed)
    n, counts = 5, [3, 0, 2, 6]  # includes a no-target sample and M > N
    block = random_block(len(counts), n, g)
    instances = [torch.rand(m, S, S, generator=g) > 0.5 for m in counts]
    coords, pix = pixel_centre_points(len(counts), 40, g)
    matcher = HungarianMatcher(**WEIGHTS, num_points=40)

    costs = matcher.cost_matrices([block], instances, point_coords=coords)[0]
    expected = reference_cost(block, instances, pix, **WEIGHTS)
    matches = matcher(block, instances, point_coords=coords)
    for b, (m, (rows, cols)) in enumerate(zip(counts, matches)):
        torch.testing.assert_close(costs[b, :, :m], expected[b], rtol=1e-5, atol=1e-5)
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(n, m)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)  # one-to-one
        if m:
            got = expected[b][rows, cols].sum().item()
            assert got == pytest.approx(brute_force_min(expected[b]), rel=1e-6, abs=1e-6)


def test_no_target_batch_gives_empty_matches():
    g = torch.Generator().manual_seed(0)
    block = random_block(2, 4, g)
    matches = HungarianMatcher(**WEIGHTS, num_points=16)(block, [torch.zeros(0, S, S, dtype=torch.bool)] * 2)
    assert [(len(r), len(c), r.dtype) for r, c in matches] == [(0, 0, torch.int64)] * 2


def test_phrase_cost_steers_matching_only_when_weighted():
    # Two identical queries for one instance; only the phrase loss tells them apart.
    mask_logits = torch.full((1, 2, S, S), -5.0)
    mask_logits[:, :, :4] = 5.0
    block = BlockPrediction(mask_logits=mask_logits, score_logits=torch.tensor([[1.0, 1.2]]),
                            phrase_loss=torch.tensor([[0.0, 1.5]]), phrase_weights=torch.ones(1, 2, 3) / 3)
    gt = torch.zeros(1, S, S, dtype=torch.bool)
    gt[:, :4] = True
    aligned = HungarianMatcher(**WEIGHTS, num_points=64)(block, [gt])
    vanilla = HungarianMatcher(score_weight=2.0, mask_weight=5.0, phrase_weight=0.0, num_points=64)(block, [gt])
    assert aligned[0][0].tolist() == [0]  # query 1 scores higher but its phrase is misaligned
    assert vanilla[0][0].tolist() == [1]  # without the phrase cost the higher score wins


def test_match_blocks_equals_per_block_matching():
    g = torch.Generator().manual_seed(3)
    blocks = [random_block(3, 6, g) for _ in range(3)]
    instances = [torch.rand(m, S, S, generator=g) > 0.4 for m in (2, 4, 0)]
    coords, _ = pixel_centre_points(3, 32, g)
    matcher = HungarianMatcher(**WEIGHTS, num_points=32)
    together = matcher.match_blocks(blocks, instances, point_coords=coords)
    for block, per_sample in zip(blocks, together):
        alone = matcher(block, instances, point_coords=coords)
        for (r1, c1), (r2, c2) in zip(per_sample, alone):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_costs_are_fp32_without_grad_under_bf16_autocast():
    g = torch.Generator().manual_seed(4)
    block = random_block(2, 4, g)
    block = BlockPrediction(block.mask_logits.bfloat16().requires_grad_(), block.score_logits.requires_grad_(),
                            block.phrase_loss, block.phrase_weights)
    instances = [torch.rand(2, 32, 32, generator=g) > 0.5, torch.rand(1, 32, 32, generator=g) > 0.5]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        costs = HungarianMatcher(**WEIGHTS, num_points=50).cost_matrices([block], instances)
    assert costs.dtype == torch.float32 and not costs.requires_grad
    assert costs.shape == (1, 2, 4, 2) and torch.isfinite(costs).all()


def test_non_finite_predictions_are_named():
    g = torch.Generator().manual_seed(5)
    block = random_block(2, 3, g)
    block.score_logits[1, 0] = float("nan")
    instances = [torch.ones(1, S, S, dtype=torch.bool)] * 2
    with pytest.raises(ValueError, match="sample 1 .*NaN/inf"):
        HungarianMatcher(**WEIGHTS, num_points=8)(block, instances)
    with pytest.raises(ValueError, match="3 instance-mask tensors for a batch of 2"):
        HungarianMatcher(**WEIGHTS, num_points=8)(block, instances + instances[:1])


def test_bf16_blocks_cost_what_their_fp32_copies_cost():
    """bf16 mask logits are upcast one block at a time (never all blocks in fp32): the same fp32 costs."""
    g = torch.Generator().manual_seed(5)
    blocks = [random_block(2, 4, g) for _ in range(2)]
    for blk in blocks:
        blk.mask_logits = blk.mask_logits.bfloat16()
    instances = [torch.rand(m, S, S, generator=g) > 0.5 for m in (3, 1)]
    coords = torch.rand(2, 64, 2, generator=g)
    matcher = HungarianMatcher(**WEIGHTS, num_points=64)
    half = matcher.cost_matrices(blocks, instances, point_coords=coords)
    upcast = [BlockPrediction(mask_logits=b.mask_logits.float(), score_logits=b.score_logits,
                              phrase_loss=b.phrase_loss, phrase_weights=b.phrase_weights) for b in blocks]
    full = matcher.cost_matrices(upcast, instances, point_coords=coords)
    assert half.dtype == torch.float32
    assert torch.equal(half, full)


def test_pair_indices_flatten_every_block_in_one_tensor():
    """The matched pairs of all blocks as (batch, query, instance) indices, instances offset per sample."""
    blocks = [[(torch.tensor([2, 0]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.int64),) * 2,
               (torch.tensor([3]), torch.tensor([0]))],
              [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([], dtype=torch.int64),) * 2,
               (torch.tensor([0]), torch.tensor([0]))]]
    pairs = HungarianMatcher.pair_indices(blocks, [2, 0, 1], "cpu")
    assert [[t.tolist() for t in p] for p in pairs] == [[[0, 0, 2], [2, 0, 3], [1, 0, 2]],
                                                        [[0, 0, 2], [1, 3, 0], [0, 1, 2]]]
    empty = HungarianMatcher.pair_indices([[(torch.tensor([], dtype=torch.int64),) * 2]], [0], "cpu")
    assert [t.numel() for t in empty[0]] == [0, 0, 0]
