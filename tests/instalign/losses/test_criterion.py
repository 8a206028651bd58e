"""The criterion (eqs. 7, 9, 13) on hand-built model outputs (point sampling: ``test_point_sampling.py``)."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from instalign.config import LossConfig
from instalign.data.batch import Batch
from instalign.losses import Criterion, HungarianMatcher, build_criterion
from instalign.losses.criterion import average_num_masks
from instalign.modeling.outputs import BlockPrediction, InstAlignOutput

S, L = 32, 5  # GT side, tokens; predictions live at S / 4


def make_batch(instances: list[torch.Tensor]) -> Batch:
    b = len(instances)
    union = torch.stack([m.any(0) if len(m) else torch.zeros(S, S, dtype=torch.bool) for m in instances])
    return Batch(images=torch.zeros(b, 3, S, S), input_ids=torch.zeros(b, L, dtype=torch.long),
                 attention_mask=torch.ones(b, L, dtype=torch.long), instance_masks=instances, union_masks=union,
                 no_target=torch.tensor([len(m) == 0 for m in instances]))


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def block(mask_logits, score_logits, phrase_loss) -> BlockPrediction:
    b, n = score_logits.shape
    return BlockPrediction(mask_logits=leaf(mask_logits), score_logits=leaf(score_logits),
                           phrase_loss=leaf(phrase_loss), phrase_weights=torch.full((b, n, L), 1.0 / L))


def random_output(b: int, n: int, num_aux: int, seed: int = 0) -> InstAlignOutput:
    g = torch.Generator().manual_seed(seed)
    h = S // 4

    def rand_block():
        return block(torch.randn(b, n, h, h, generator=g), torch.randn(b, n, generator=g),
                     torch.rand(b, n, generator=g))

    return InstAlignOutput(final=rand_block(), merged_logits=leaf(torch.randn(b, h, h, generator=g)),
                           no_target_logits=leaf(torch.randn(b, generator=g)),
                           text_mask=torch.ones(b, L, dtype=torch.bool), aux=[rand_block() for _ in range(num_aux)])


def random_instances(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(m, S, S, generator=g) > 0.5 for m in counts]


def criterion(**overrides) -> Criterion:
    cfg = dict(num_points=256)
    cfg.update(overrides)
    return build_criterion(LossConfig(**cfg))


# --- criterion: zero / non-zero where it must be ------------------------------------------

def perfect_case():
    """Sample 0: one full-image instance; sample 1: no target. Predictions confident and right."""
    h, n = S // 4, 3
    mask_logits = torch.full((2, n, h, h), -20.0)
    mask_logits[0, 1] = 20.0
    score_logits = torch.full((2, n), -20.0)
    score_logits[0, 1] = 20.0
    out = InstAlignOutput(
        final=block(mask_logits, score_logits, torch.zeros(2, n)),
        merged_logits=leaf(torch.stack([torch.full((h, h), 20.0), torch.full((h, h), -20.0)])),
        no_target_logits=leaf(torch.tensor([-20.0, 20.0])),
        text_mask=torch.ones(2, L, dtype=torch.bool))
    return out, make_batch([torch.ones(1, S, S, dtype=torch.bool), torch.zeros(0, S, S, dtype=torch.bool)])


def test_perfect_predictions_give_near_zero_losses():
    out, batch = perfect_case()
    losses = criterion()(out, batch)
    for name in ("loss", "loss_merged", "loss_nt", "loss_inst", "loss_score", "loss_unmatched", "loss_mask",
                 "loss_dice", "loss_phrase"):
        assert losses[name].item() < 1e-3, name
    swapped = [torch.zeros(0, S, S, dtype=torch.bool), torch.ones(1, S, S, dtype=torch.bool)]
    wrong = criterion()(out, make_batch(swapped))
    for name in ("loss_merged", "loss_nt", "loss_score", "loss_mask", "loss_dice"):
        assert wrong[name].item() > 0.5, name


def test_aligned_partial_masks_beat_inverted_ones():
    h = S // 4
    gt = torch.zeros(2, S, S, dtype=torch.bool)
    gt[0, :16, :16] = True
    gt[1, 16:, 8:24] = True
    logits = torch.full((1, 2, h, h), -10.0)
    logits[0, 0, :4, :4] = 10.0
    logits[0, 1, 4:, 2:6] = 10.0
    out = random_output(1, 2, 0)
    out.final = block(logits, torch.full((1, 2), 10.0), torch.zeros(1, 2))
    good = criterion(importance_sample_ratio=0.0, num_points=2048)(out, make_batch([gt]))
    out.final = block(-logits, torch.full((1, 2), 10.0), torch.zeros(1, 2))
    bad = criterion(importance_sample_ratio=0.0, num_points=2048)(out, make_batch([gt]))
    assert good["loss_mask"] < 0.1 and good["loss_dice"] < 0.1  # only the boundary band
    assert bad["loss_mask"] > 2 and bad["loss_dice"] > 0.4


def test_no_target_batch_has_no_mask_terms_but_still_gradients():
    out = random_output(2, 4, 1)
    batch = make_batch([torch.zeros(0, S, S, dtype=torch.bool)] * 2)
    losses = criterion()(out, batch)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_phrase"] == 0
    # Every query is unmatched: BCE against 0 summed over all B·N queries, divided by max(0 instances, 1).
    expected = F.binary_cross_entropy_with_logits(out.final.score_logits, torch.zeros(2, 4), reduction="sum")
    assert losses["loss_unmatched"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss_score"] == 0
    losses["loss"].backward()
    for t in (out.final.mask_logits, out.final.phrase_loss, out.aux[0].mask_logits):
        assert t.grad is not None and t.grad.abs().sum() == 0  # connected, zero
    assert out.final.score_logits.grad.abs().sum() > 0


def test_total_is_eq13_and_gradients_reach_every_input():
    out = random_output(3, 5, 2)
    batch = make_batch(random_instances([2, 0, 3]))
    crit = criterion(merged_weight=5.0, inst_weight=1.0, nt_weight=0.1)
    losses = crit(out, batch)
    total = 5.0 * losses["loss_merged"] + 1.0 * losses["loss_inst"] + 0.1 * losses["loss_nt"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert losses["loss"].requires_grad and not losses["loss_inst"].requires_grad
    final = (2.0 * losses["loss_score"] + losses["loss_unmatched"] + 5.0 * (losses["loss_mask"] + losses["loss_dice"])
             + 1.0 * losses["loss_phrase"])
    assert losses["loss_inst_2"].item() == pytest.approx(final.item(), rel=1e-6)  # final block is last
    losses["loss"].backward()
    inputs = {"merged": out.merged_logits, "no_target": out.no_target_logits}
    for k, blk in enumerate([*out.aux, out.final]):
        inputs.update({f"score_{k}": blk.score_logits, f"mask_{k}": blk.mask_logits, f"phrase_{k}": blk.phrase_loss})
    for name, t in inputs.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def test_instance_supervision_none_is_merged_plus_no_target_only():
    out = random_output(2, 4, 2)
    losses = criterion(instance_supervision="none")(out, make_batch(random_instances([2, 1])))
    assert set(losses) == {"loss", "loss_merged", "loss_nt"}
    assert losses["loss"].item() == pytest.approx((5.0 * losses["loss_merged"] + 0.1 * losses["loss_nt"]).item())


def test_vanilla_has_no_phrase_term_and_no_phrase_cost():
    out = random_output(2, 4, 1)
    crit = criterion(instance_supervision="vanilla", phrase_weight=3.0)
    assert crit.matcher.phrase_weight == 0.0
    losses = crit(out, make_batch(random_instances([2, 1])))
    assert "loss_phrase" not in losses and "loss_inst" in losses
    assert losses["loss_inst_1"].item() == pytest.approx(
        (2.0 * losses["loss_score"] + losses["loss_unmatched"]
         + 5.0 * (losses["loss_mask"] + losses["loss_dice"])).item(), rel=1e-6)
    losses["loss"].backward()
    assert out.final.phrase_loss.grad is None
    with pytest.raises(ValueError, match="matches without the phrase cost"):
        Criterion(matcher=HungarianMatcher(score_weight=2, mask_weight=5, phrase_weight=1, num_points=8),
                  merged_weight=5, inst_weight=1, nt_weight=0.1, score_weight=2, mask_weight=5, phrase_weight=1,
                  instance_supervision="vanilla", deep_supervision=True, num_points=8, oversample_ratio=3,
                  importance_sample_ratio=0.75)


def test_deep_supervision_adds_one_term_per_block():
    out = random_output(2, 4, 3)
    batch = make_batch(random_instances([1, 2]))
    torch.manual_seed(0)
    deep = criterion()(out, batch)
    assert {f"loss_inst_{k}" for k in range(4)} <= set(deep)
    assert deep["loss_inst"].item() == pytest.approx(sum(deep[f"loss_inst_{k}"].item() for k in range(4)), rel=1e-6)
    torch.manual_seed(0)
    shallow = criterion(deep_supervision=False)(out, batch)
    assert not any(k.startswith("loss_inst_") for k in shallow)
    shallow["loss"].backward()
    assert out.aux[0].mask_logits.grad is None and out.final.mask_logits.grad is not None


# --- eq. 7 and eq. 13 by hand ----------------------------------------------------------------

def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("nt_pos_weight", [1.0, 3.0])
def test_every_term_against_a_hand_computation(nt_pos_weight):
    """Sample 0: one full-image instance; sample 1: no target; N = 3 queries of constant masks.

    With constant logits every point-sampled value is known, so each term of eqs. 7, 9, 13 can be
    written out: query 1 of sample 0 is the cheapest match (best score, mask and phrase); the
    other 2 + 3 queries are unmatched.
    """
    h, n, p = S // 4, 3, 64
    scores = [[-1.0, 2.0, 0.5], [-2.0, 0.3, -0.7]]
    masks = [[-1.5, 3.0, 0.2], [0.4, -0.6, 1.1]]
    phrase = [[0.9, 0.1, 0.6], [0.5, 0.4, 0.3]]
    merged, nt = [1.2, -0.8], [-0.4, 0.9]
    out = InstAlignOutput(
        final=block(torch.tensor(masks)[:, :, None, None].expand(2, n, h, h), torch.tensor(scores),
                    torch.tensor(phrase)),
        merged_logits=leaf(torch.tensor(merged)[:, None, None].expand(2, h, h)),
        no_target_logits=leaf(torch.tensor(nt)), text_mask=torch.ones(2, L, dtype=torch.bool))
    batch = make_batch([torch.ones(1, S, S, dtype=torch.bool), torch.zeros(0, S, S, dtype=torch.bool)])
    crit = criterion(num_points=p, deep_supervision=False, nt_pos_weight=nt_pos_weight)
    losses = crit(out, batch)

    num_masks = 1  # one GT instance in the batch (one worker)
    c = masks[0][1]
    score = softplus(-scores[0][1]) / num_masks  # λ_score's term: matched query, BCE(p̂, 1)
    unmatched = (softplus(scores[0][0]) + softplus(scores[0][2]) + sum(softplus(x) for x in scores[1])) / num_masks
    mask = softplus(-c) / num_masks  # BCE against 1 at every point
    dice = (1 - (2 * p * sigmoid(c) + 1) / (p * sigmoid(c) + p + 1)) / num_masks
    phrase_term = phrase[0][1] / num_masks
    inst = 2.0 * score + 1.0 * unmatched + 5.0 * (mask + dice) + 1.0 * phrase_term  # eq. 7
    area = S * S
    merged_bce = (softplus(-merged[0]) + softplus(merged[1])) / 2  # full target, empty target
    merged_dice = ((1 - (2 * area * sigmoid(merged[0]) + 1) / (area * sigmoid(merged[0]) + area + 1))
                   + (1 - 1 / (area * sigmoid(merged[1]) + 1))) / 2
    loss_nt = (softplus(nt[0]) + nt_pos_weight * softplus(-nt[1])) / 2  # sample 1 is the positive
    total = 5.0 * (merged_bce + merged_dice) + 1.0 * inst + 0.1 * loss_nt  # eq. 13

    expected = {"loss_score": score, "loss_unmatched": unmatched, "loss_mask": mask, "loss_dice": dice,
                "loss_phrase": phrase_term, "loss_inst": inst, "loss_merged": merged_bce + merged_dice,
                "loss_nt": loss_nt, "loss": total}
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    assert 1.0 * unmatched > 2.0 * score  # the unweighted unmatched sum is what eq. 7 makes dominant here


def test_nt_pos_weight_must_be_positive():
    from instalign.config import ConfigError

    with pytest.raises(ConfigError, match="nt_pos_weight"):
        LossConfig(nt_pos_weight=0.0)


# --- normalisation ------------------------------------------------------------------------

def constant_case(n: int, counts: list[int], logit: float):
    """Full-image instances and query masks of one constant logit: every point's BCE is known."""
    h = S // 4
    score = torch.full((len(counts), n), -3.0)
    out = random_output(len(counts), n, 0)
    out.final = block(torch.full((len(counts), n, h, h), logit), score, torch.full((len(counts), n), 0.25))
    return out, make_batch([torch.ones(m, S, S, dtype=torch.bool) for m in counts])


def test_mask_terms_are_normalised_by_the_number_of_instances():
    n, counts, c, p = 2, [1, 3], 0.7, 256  # sample 1 has M > N: only N of its instances are matched
    out, batch = constant_case(n, counts, c)
    losses = criterion(num_points=p)(out, batch)
    pairs, num_masks = 1 + 2, 1 + 3
    prob = 1 / (1 + math.exp(-c))
    assert losses["loss_mask"].item() == pytest.approx(pairs * math.log1p(math.exp(-c)) / num_masks, rel=1e-5)
    dice = 1 - (2 * p * prob + 1) / (p * prob + p + 1)
    assert losses["loss_dice"].item() == pytest.approx(pairs * dice / num_masks, rel=1e-5)
    assert losses["loss_phrase"].item() == pytest.approx(pairs * 0.25 / num_masks, rel=1e-6)
    # Scores: BCE(-3, 1) for the 3 matched queries, BCE(-3, 0) for the 1 unmatched, each summed and
    # divided by the same 4 instances (eq. 7's ratio between its terms).
    assert losses["loss_score"].item() == pytest.approx(3 * math.log1p(math.exp(3.0)) / num_masks, rel=1e-6)
    assert losses["loss_unmatched"].item() == pytest.approx(1 * math.log1p(math.exp(-3.0)) / num_masks, rel=1e-6)


def _distributed_worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out, batch = constant_case(4, [1] if rank == 0 else [3], 0.7)
        losses = criterion(num_points=64)(out, batch)
        num_masks = average_num_masks(1 if rank == 0 else 3, torch.device("cpu"))
        with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump({"num_masks": float(num_masks), "loss_mask": losses["loss_mask"].item()}, f)
    finally:
        dist.destroy_process_group()


def test_num_masks_is_averaged_across_workers(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [pickle.loads((tmp_path / f"{r}.pkl").read_bytes()) for r in range(2)]
    assert [r["num_masks"] for r in results] == [2.0, 2.0]  # (1 + 3) / 2 workers
    per_pair = math.log1p(math.exp(-0.7))
    assert results[0]["loss_mask"] == pytest.approx(1 * per_pair / 2, rel=1e-5)
    assert results[1]["loss_mask"] == pytest.approx(3 * per_pair / 2, rel=1e-5)
    assert average_num_masks(0, torch.device("cpu")) == 1.0  # no process group: local count, at least 1


def test_bf16_mask_logits_give_the_losses_and_gradients_of_upcasting_them_first():
    """The criterion upcasts only the matched masks: same values and gradients as an fp32 copy."""
    batch = make_batch(random_instances([2, 1]))
    outs = []
    for upcast in (False, True):
        out = random_output(2, 4, 1)
        for blk in [out.final, *out.aux]:
            blk.mask_logits = leaf(blk.mask_logits.bfloat16())
        if upcast:
            for blk in [out.final, *out.aux]:
                blk.mask_logits_bf16, blk.mask_logits = blk.mask_logits, blk.mask_logits.float()
        torch.manual_seed(0)
        losses = criterion()(out, batch)
        losses["loss"].backward()
        outs.append((out, losses))
    (half, got), (full, want) = outs
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for a, b in zip([half.final, *half.aux], [full.final, *full.aux]):
        assert a.mask_logits.dtype == torch.bfloat16
        torch.testing.assert_close(a.mask_logits.grad, b.mask_logits_bf16.grad, rtol=0, atol=0)


# --- precision and input checks -----------------------------------------------------------

def test_losses_are_fp32_under_bf16_autocast():
    out = random_output(2, 4, 1)
    batch = make_batch(random_instances([2, 1]))
    torch.manual_seed(0)
    ref = criterion()(out, batch)
    half = random_output(2, 4, 1)
    for blk in [half.final, *half.aux]:
        blk.mask_logits = leaf(blk.mask_logits.bfloat16())
    half.merged_logits = leaf(half.merged_logits.bfloat16())
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = criterion()(half, batch)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)
    got["loss"].backward()
    assert half.final.mask_logits.grad.dtype == torch.bfloat16


def test_batch_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="outputs are for 2 samples but the batch has 3"):
        criterion()(random_output(2, 4, 0), make_batch(random_instances([1, 1, 1])))
