"""The report of a search (``pipelines.tuning.report``): trial status, table, plot."""

from __future__ import annotations

import json
import math

from instalign.config import load_config


def test_expected_iterations_follow_the_schedule():
    from pipelines.tuning.report import expected_iterations

    cfg = load_config("tiny", ["train.epochs=3", "train.batch_size=8"])
    assert expected_iterations(cfg, 32, max_iterations=10) == 3
    assert expected_iterations(cfg, 32, max_iterations=2) == 2  # ASHA's max_t caps it
    # max_steps=5 with 4 steps per epoch: a full epoch and a begun one.
    assert expected_iterations(load_config(cfg, ["train.max_steps=5"]), 32, max_iterations=10) == 2


def test_table_and_plot_of_trials(tmp_path):
    from pipelines.tuning.report import TrialRow, pick_best, plot_metric_vs_params, write_table
    from pipelines.tuning.space import load_space

    space_path = tmp_path / "s.yaml"
    space_path.write_text("base: tiny\nsearch: random\nparams:\n"
                          "  loss.merged_weight: {type: loguniform, low: 1.0, high: 10.0}\n"
                          "  model.aggregation: {type: choice, values: [aia, aia_no_prelu, fixed_threshold]}\n")
    space = load_space(space_path)
    rows = [TrialRow("a_00000", "completed", {"loss.merged_weight": 2.0, "model.aggregation": "aia"}, 3, 40.0, 39.0,
                     2, "/ckpt/a", "run-a"),
            TrialRow("a_00001", "stopped_early", {"loss.merged_weight": 8.0, "model.aggregation": "aia_no_prelu"}, 1,
                     20.0, 20.0, 1, "/ckpt/b", "run-b"),
            TrialRow("a_00002", "error", {"loss.merged_weight": 1.5, "model.aggregation": "fixed_threshold"}, 0,
                     math.nan, math.nan, 0, None, None, "RuntimeError: boom")]
    assert pick_best(rows, "max").trial_id == "a_00000" and pick_best(rows, "min").trial_id == "a_00001"
    csv_path, json_path = write_table(rows, "val_gIoU", tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",")[:6] == ["trial_id", "status", "iterations", "val_gIoU_best", "val_gIoU_last",
                                       "best_iteration"]
    assert "loss.merged_weight" in lines[0] and len(lines) == 4 and "RuntimeError: boom" in lines[3]
    table = json.loads(json_path.read_text())  # strict JSON: a missing metric is null, not NaN
    assert [r["status"] for r in table] == ["completed", "stopped_early", "error"] and table[2]["best"] is None
    png = plot_metric_vs_params(rows, space, "val_gIoU", tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_best_so_far_follows_each_validated_result(caplog):
    """The driver's line per trial result: the trial's value beside the best trial so far."""
    import logging
    from types import SimpleNamespace

    import pytest

    from pipelines.tuning.report import BestSoFar

    a = SimpleNamespace(trial_id="t_00000", config={"train.lr": 0.01, "loss.nt_weight": 0.5})
    b = SimpleNamespace(trial_id="t_00001", config={"train.lr": 1e-9, "loss.nt_weight": 1.0})
    best = BestSoFar("val_gIoU", "max")
    with caplog.at_level(logging.INFO, logger="pipelines.tuning.report"):
        best.on_trial_result(1, [a, b], a, {"val_gIoU": 20.0, "training_iteration": 1})
        best.on_trial_result(1, [a, b], b, {"val_gIoU": math.nan, "training_iteration": 1})  # not validated
        best.on_trial_result(2, [a, b], b, {"val_gIoU": 5.0, "training_iteration": 1})
        best.on_trial_result(3, [a, b], a, {"val_gIoU": 31.5, "training_iteration": 2})
        best.on_trial_result(4, [a, b], a, {"val_gIoU": 31.5, "training_iteration": 2})  # the final state again
    assert caplog.messages == [
        "trial t_00000 epoch 1: val_gIoU 20.00 | best so far: trial t_00000 val_gIoU 20.00 "
        "(epoch 1; loss.nt_weight=0.5, train.lr=0.01)",
        "trial t_00001 epoch 1: val_gIoU 5.00 | best so far: trial t_00000 val_gIoU 20.00 "
        "(epoch 1; loss.nt_weight=0.5, train.lr=0.01)",
        "trial t_00000 epoch 2: val_gIoU 31.50 | best so far: trial t_00000 val_gIoU 31.50 "
        "(epoch 2; loss.nt_weight=0.5, train.lr=0.01)"]
    lowest = BestSoFar("val_gIoU", "min")
    lowest.on_trial_result(1, [a, b], a, {"val_gIoU": 20.0, "training_iteration": 1})
    lowest.on_trial_result(1, [a, b], b, {"val_gIoU": 5.0, "training_iteration": 1})
    assert lowest.best[:2] == (5.0, "t_00001")
    with pytest.raises(ValueError, match="mode='best'"):
        BestSoFar("val_gIoU", "best")


def test_a_trial_that_never_started_is_unfinished_not_a_crash():
    """A search interrupted while a trial was still PENDING: Tune's result for it has no
    config, no metrics and no history — the report says "unfinished" for it."""
    from types import SimpleNamespace

    from pipelines.tuning.report import summarize

    base = load_config("tiny", ["train.epochs=2", "train.batch_size=8"])
    pending = SimpleNamespace(metrics_dataframe=None, metrics=None, config=None, error=None,
                              path="/runs/nt-search/trial_driver_efc08_00001_1_loss_nt_weight=1.0000_2026-11-30")
    (row,) = summarize([pending], base=base, metric="val_gIoU", mode="max", train_samples=32, max_iterations=2,
                       run_ids={}, tune_status={"efc08_00001": "PENDING"})
    assert (row.trial_id, row.status, row.params, row.iterations) == ("efc08_00001", "unfinished", {}, 0)
    assert math.isnan(row.best) and row.mlflow_run_id is None
