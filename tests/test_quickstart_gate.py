"""The quickstart's promotion gate and its no-target class balance (no Ray, no training)."""

from __future__ import annotations

import math

import pytest

from pipelines.quickstart import MIN_CLASS_ACC, promotion_gate

BASELINES = {  # what the two trivial predictors score on a split with 23 % no-target samples
    "always empty": {"gIoU": 0.0, "cIoU": 0.0, "N_acc": 0.0, "T_acc": 100.0},
    "always no-target": {"gIoU": 22.8, "cIoU": 0.0, "N_acc": 100.0, "T_acc": 0.0},
}


def model(g: float, n: float, t: float) -> dict[str, float]:
    return {"gIoU": g, "cIoU": g, "N_acc": n, "T_acc": t}


@pytest.mark.parametrize("metrics, promoted", [
    (model(65.0, 70.0, 90.0), True),
    (model(49.5, 0.0, 100.0), False),  # never says no-target: beats the baselines on gIoU alone, not champion
    (model(23.0, 100.0, 0.0), False),  # always says it
    (model(22.8, 80.0, 80.0), False),  # gIoU must be strictly above the best baseline
    (model(60.0, MIN_CLASS_ACC, MIN_CLASS_ACC), True),  # the floor itself passes
    (model(60.0, math.nan, 90.0), False),  # a val split without no-target samples cannot show it
])
def test_gate_needs_giou_above_the_baselines_and_both_class_accuracies(metrics, promoted):
    ok, text = promotion_gate(metrics, BASELINES)
    assert ok is promoted
    # The rule and this version's numbers, in words: what goes into the model version's description.
    assert "@champion only if val gIoU beats every trivial baseline" in text
    assert f"N-acc and T-acc are each >= {MIN_CLASS_ACC:.0f}" in text
    assert f"{metrics['gIoU']:.1f}" in text and "always no-target" in text
    assert text.endswith("promoted to @champion." if promoted else "not promoted.")
    assert ("FAIL" in text) != promoted

