"""GRES / Ref-ZOM metrics against hand-computed cases (DESIGN §4, ReLA's semantics)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from instalign.metrics import NT_BINS, GRESMetrics, NoTargetScores, RefZOMMetrics

H = W = 4


def mask(*cells: tuple[int, int]) -> np.ndarray:
    """A 4×4 boolean mask with the given (row, col) cells set."""
    m = np.zeros((H, W), dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


EMPTY = mask()
ROW0 = mask((0, 0), (0, 1), (0, 2), (0, 3))  # 4 px
ROW0_3 = mask((0, 0), (0, 1), (0, 2))  # 3 px, inside ROW0
ROW0_5 = mask((0, 0), (0, 1), (0, 2), (0, 3), (1, 0))  # 5 px, contains ROW0

# One sample per outcome, with what ReLA's evaluator gives for each.
#          pred mask                              pred_nt  gt mask  gt_nt
GRES_CASES = [
    (EMPTY, True, EMPTY, True),  # TP: IoU 1, nothing into I/U
    (mask((3, 0), (3, 1), (3, 2)), False, EMPTY, True),  # FN: IoU 0, U += 3
    (mask((0, 0), (0, 1), (2, 2), (2, 3), (3, 3), (1, 1)), True, ROW0, False),  # FP: mask emptied → I 0, U 4
    (mask((0, 0), (0, 1), (0, 2), (1, 1)), False, ROW0, False),  # TN: I 3, U 5, IoU 0.6
    (mask((2, 2), (2, 3)), False, mask((2, 2), (2, 3)), False),  # TN: I 2, U 2, IoU 1
    (ROW0, False, ROW0_5, False),  # TN: I 4, U 5, IoU 0.8 (exactly the Pr@0.8 threshold)
]


def stack(cases, start=0, stop=None):
    cases = cases[start:stop]
    return (np.stack([c[0] for c in cases]), np.array([c[1] for c in cases]),
            np.stack([c[2] for c in cases]), np.array([c[3] for c in cases]))


def test_gres_every_branch_by_hand():
    m = GRESMetrics()
    m.update(*stack(GRES_CASES))
    s = m.state_dict()
    assert (s["tp"], s["fn"], s["fp"], s["tn"]) == (1, 1, 1, 3)
    assert (s["samples"], s["targeted"], s["no_target"]) == (6, 4, 2)
    assert s["inter"] == 0 + 3 + 2 + 4
    assert s["union"] == 3 + 4 + 5 + 2 + 5
    r = m.compute()
    assert r["cIoU"] == pytest.approx(100 * 9 / 19)
    assert r["gIoU"] == pytest.approx(100 * (1 + 0 + 0 + 0.6 + 1 + 0.8) / 6)
    assert r["N_acc"] == pytest.approx(50.0)  # TP / (TP + FN) = 1 / 2
    assert r["T_acc"] == pytest.approx(75.0)  # TN / (TN + FP) = 3 / 4
    assert r["Pr@0.7"] == pytest.approx(50.0)  # IoUs of targeted samples: 0, 0.6, 1, 0.8
    assert r["Pr@0.8"] == pytest.approx(50.0)  # ≥, so 0.8 counts
    assert r["Pr@0.9"] == pytest.approx(25.0)


def test_gres_false_positive_treats_flagged_mask_as_empty():
    # The raw mask overlaps the GT by 2 px and covers 6: with the flag it must not count.
    pred = mask((0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (2, 3))
    m = GRESMetrics()
    m.update(pred[None], np.array([True]), ROW0[None], np.array([False]))
    assert m.state_dict()["inter"] == 0 and m.state_dict()["union"] == 4
    r = m.compute()
    assert r["cIoU"] == 0.0 and r["gIoU"] == 0.0 and r["T_acc"] == 0.0
    assert math.isnan(r["N_acc"])  # no no-target samples: undefined, not 0


def test_gres_undefined_denominators_are_nan_and_never_raise():
    r = GRESMetrics().compute()
    assert all(math.isnan(v) for k, v in r.items() if not k.endswith(".samples"))
    assert [v for k, v in r.items() if k.endswith(".samples")] == [0] * 5  # each slice's count
    m = GRESMetrics()
    m.update(EMPTY[None], np.array([True]), EMPTY[None], np.array([True]))  # one TP only
    r = m.compute()
    assert r["gIoU"] == 100.0 and r["N_acc"] == 100.0
    assert math.isnan(r["cIoU"]) and math.isnan(r["T_acc"]) and math.isnan(r["Pr@0.7"])


def test_targeted_sample_with_empty_union_has_iou_zero():
    m = GRESMetrics()
    m.update(EMPTY[None], np.array([False]), EMPTY[None], np.array([False]))
    r = m.compute()
    assert r["gIoU"] == 0.0 and r["T_acc"] == 100.0 and math.isnan(r["cIoU"])


def test_gres_merge_of_halves_equals_one_pass():
    one = GRESMetrics()
    one.update(*stack(GRES_CASES))
    a, b = GRESMetrics(), GRESMetrics()
    a.update(*stack(GRES_CASES, 0, 3))
    b.update(*stack(GRES_CASES, 3))
    merged = a.merge(b)
    assert merged.state_dict() == pytest.approx(one.state_dict())
    assert merged.compute() == pytest.approx(one.compute(), nan_ok=True)  # slices without counts: NaN


def test_gres_state_crosses_process_boundaries():
    m = GRESMetrics()
    m.update(*stack(GRES_CASES))
    state = json.loads(json.dumps(m.state_dict()))  # plain numbers only
    again = GRESMetrics.from_state(state)
    assert again.compute() == pytest.approx(m.compute(), nan_ok=True)
    fresh = GRESMetrics()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == m.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        GRESMetrics.from_state({k: v for k, v in state.items() if k != "tp"})
    with pytest.raises(TypeError):
        GRESMetrics().merge(RefZOMMetrics())


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    pred = rng.random((8, 16, 16)) > 0.5
    gt = rng.random((8, 16, 16)) > 0.6
    gt_nt = np.array([0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    gt[gt_nt] = False
    pred_nt = np.array([0, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    for cls in (GRESMetrics, RefZOMMetrics):
        a, b, c = cls(), cls(), cls()
        a.update(pred, pred_nt, gt, gt_nt)
        b.update(torch.from_numpy(pred), torch.from_numpy(pred_nt), torch.from_numpy(gt), torch.from_numpy(gt_nt))
        # Integer masks are read as non-zero = True.
        c.update(pred.astype(np.uint8), pred_nt.astype(np.int64), torch.from_numpy(gt).long(), gt_nt)
        assert a.state_dict() == b.state_dict() == c.state_dict()


def test_bad_inputs_get_clear_errors():
    m = GRESMetrics()
    with pytest.raises(TypeError, match="threshold"):
        m.update(np.zeros((1, 4, 4), dtype=np.float32), np.array([False]), ROW0[None], np.array([False]))
    with pytest.raises(ValueError, match="one shape"):
        m.update(np.zeros((1, 4, 5), dtype=bool), np.array([False]), ROW0[None], np.array([False]))
    with pytest.raises(ValueError, match=r"flags must be \(1,\)"):
        m.update(ROW0[None], np.array([False, True]), ROW0[None], np.array([False]))
    with pytest.raises(ValueError, match="labelled no-target but its GT mask has 4 pixels"):
        m.update(ROW0[None], np.array([False]), ROW0[None], np.array([True]))
    assert m.state_dict()["samples"] == 0  # nothing half-added


def test_refzom_by_hand():
    cases = [
        (mask((0, 0), (0, 1), (0, 2), (1, 1)), False, ROW0, False),  # targeted: I 3, U 5
        (ROW0_3, True, ROW0, False),  # targeted, flagged: mask emptied → I 0, U 4
        (EMPTY, False, EMPTY, True),  # no-target, empty prediction: correct
        (mask((3, 3), (3, 2)), False, EMPTY, True),  # no-target, 2 px predicted: wrong
        (mask((3, 3), (3, 2)), True, EMPTY, True),  # no-target, flagged: emptied, correct
    ]
    m = RefZOMMetrics()
    m.update(*stack(cases))
    s = m.state_dict()
    assert (s["samples"], s["targeted"], s["no_target"], s["nt_correct"]) == (5, 2, 3, 2)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100 * (0.6 + 0.0) / 2)
    assert r["oIoU"] == pytest.approx(100 * 3 / 9)
    assert r["Acc"] == pytest.approx(100 * 2 / 3)

    a, b = RefZOMMetrics(), RefZOMMetrics()
    a.update(*stack(cases, 0, 2))
    b.update(*stack(cases, 2))
    assert a.merge(b).state_dict() == pytest.approx(s)
    only_targets = RefZOMMetrics()
    only_targets.update(*stack(cases, 0, 2))
    assert math.isnan(only_targets.compute()["Acc"])


# --- the no-target head as a classifier ---------------------------------------------------

def exact_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return 100.0 * float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def test_no_target_auroc_is_exact_to_the_bin_width():
    rng = np.random.default_rng(0)
    pos, neg = rng.beta(4, 2, 300), rng.beta(2, 4, 900)  # overlapping classes
    scores = NoTargetScores()
    scores.update(torch.tensor(np.concatenate([pos, neg])), np.r_[np.ones(300, bool), np.zeros(900, bool)])
    auroc = scores.compute()["nt_AUROC"]
    assert 70 < auroc < 95
    # Only pairs within one bin (width 1/NT_BINS) can be misordered: bound their share.
    close = float((np.abs(pos[:, None] - neg[None]) < 1.0 / NT_BINS).mean())
    assert abs(auroc - exact_auroc(pos, neg)) <= 100.0 * close + 1e-9
    # Perfect and inverted rankings, and ties
    perfect = NoTargetScores()
    perfect.update(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([True, True, False, False]))
    assert perfect.auroc() == 100.0
    inverted = NoTargetScores()
    inverted.update(torch.tensor([0.1, 0.9]), torch.tensor([True, False]))
    assert inverted.auroc() == 0.0
    tied = NoTargetScores()
    tied.update(torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert tied.auroc() == 50.0
    assert math.isnan(NoTargetScores().auroc())  # a class without samples: undefined, not 0


def test_no_target_scores_merge_like_sums_and_round_trip():
    rng = np.random.default_rng(1)
    probs, labels = rng.random(200), rng.random(200) < 0.3
    whole = NoTargetScores()
    whole.update(probs, labels)
    parts = [NoTargetScores() for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(probs[i::3], labels[i::3])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.state_dict() == whole.state_dict()
    back = NoTargetScores.from_state(json.loads(json.dumps(whole.state_dict())))
    assert back.auroc() == whole.auroc()
    with pytest.raises(ValueError, match="probabilities"):
        whole.update(torch.tensor([1.5]), torch.tensor([True]))


def test_no_target_threshold_choice_and_accuracies():
    scores = NoTargetScores()
    # no-target at 0.30, 0.35, 0.60; targeted at 0.10, 0.20, 0.32
    scores.update(torch.tensor([0.30, 0.35, 0.60, 0.10, 0.20, 0.32]),
                  torch.tensor([True, True, True, False, False, False]))
    assert scores.accuracies(0.5) == (pytest.approx(100 / 3), 100.0)  # the paper's 0.5: one no-target found
    best = scores.best_threshold()
    assert 0.20 < best <= 0.30  # all no-target found, 2 of 3 targeted kept
    n_acc, t_acc = scores.accuracies(best)
    assert n_acc == 100.0 and t_acc == pytest.approx(200 / 3)


def test_no_target_score_quartiles_per_class_are_within_a_bin_of_the_exact_ones():
    rng = np.random.default_rng(1)
    pos, neg = rng.beta(2, 5, 400), rng.beta(1, 8, 1200)  # a head that ranks well but stays below 0.5
    scores = NoTargetScores()
    scores.update(torch.tensor(np.concatenate([pos, neg])), np.r_[np.ones(400, bool), np.zeros(1200, bool)])
    out = scores.compute()
    for cls, values in (("no_target", pos), ("targeted", neg)):
        for q in (25, 50, 75):
            assert abs(out[f"nt_score_{cls}_p{q}"] - np.quantile(values, q / 100)) <= 2.0 / NT_BINS
    assert out["nt_score_no_target_p75"] < 0.5 < out["nt_AUROC"] / 100  # a threshold problem, not a ranking one
    empty = NoTargetScores()
    empty.update(torch.tensor([0.2]), np.array([False]))
    assert math.isnan(empty.compute()["nt_score_no_target_p50"]) and empty.quantile(1.0, no_target=False) == 0.201
    with pytest.raises(ValueError):
        empty.quantile(1.5, no_target=True)


def test_slices_split_the_overall_sums_by_kind_of_sample_and_leave_the_overall_numbers_alone():
    g = torch.Generator().manual_seed(3)
    n = 40
    gt_nt = torch.rand(n, generator=g) < 0.25
    targets = torch.where(gt_nt, 0, torch.randint(1, 5, (n,), generator=g))
    gt = (torch.rand(n, 8, 8, generator=g) < 0.4) & ~gt_nt[:, None, None]
    pred = torch.rand(n, 8, 8, generator=g) < 0.4
    pred_nt = torch.rand(n, generator=g) < 0.3
    plain, sliced, merged = GRESMetrics(), GRESMetrics(), GRESMetrics()
    for lo in range(0, n, 7):  # batches of 7
        batch = pred[lo:lo + 7], pred_nt[lo:lo + 7], gt[lo:lo + 7], gt_nt[lo:lo + 7]
        plain.update(*batch)
        sliced.update(*batch, targets[lo:lo + 7])
        part = GRESMetrics()
        part.update(*batch, targets[lo:lo + 7].tolist())
        merged.merge(part)
    r, p = sliced.compute(), plain.compute()
    for key in ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7"):  # ReLA's numbers: unchanged by slicing
        assert r[key] == p[key]
    assert merged.compute() == pytest.approx(r)  # mergeable sums
    # each slice, by hand: the same per-sample rules over its own samples
    for name, keep in (("single", targets == 1), ("multi", targets >= 2), ("multi_2", targets == 2),
                       ("multi_3plus", targets >= 3), ("no_target", gt_nt)):
        alone = GRESMetrics()
        alone.update(pred[keep], pred_nt[keep], gt[keep], gt_nt[keep])
        expect = alone.compute()
        assert r[f"{name}.samples"] == int(keep.sum()) > 0
        assert r[f"{name}.gIoU"] == pytest.approx(expect["gIoU"])
        assert r[f"{name}.cIoU"] == pytest.approx(expect["cIoU"], nan_ok=True)
    assert r["single.samples"] + r["multi.samples"] + r["no_target.samples"] == n
    assert r["no_target.gIoU"] == pytest.approx(r["N_acc"])  # IoU 1 or 0 per no-target sample
    # without instance counts only the no-target slice is known
    assert p["no_target.samples"] == r["no_target.samples"] and p["single.samples"] == p["multi.samples"] == 0
    with pytest.raises(ValueError, match="num_targets has 2 values for a batch of 1"):
        GRESMetrics().update(pred[:1], pred_nt[:1], gt[:1], gt_nt[:1], [1, 2])
