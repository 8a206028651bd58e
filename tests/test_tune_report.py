"""The report of a search (``pipelines.tune_report``): trial status, table, plot."""

from __future__ import annotations

import json
import math

from instalign.config import load_config


def test_expected_iterations_follow_the_schedule():
    from pipelines.tune_report import expected_iterations

    cfg = load_config("tiny", ["train.epochs=3", "train.batch_size=8"])
    assert expected_iterations(cfg, 32, max_iterations=10) == 3
    assert expected_iterations(cfg, 32, max_iterations=2) == 2  # ASHA's max_t caps it
    # max_steps=5 with 4 steps per epoch: a full epoch and a begun one.
    assert expected_iterations(load_config(cfg, ["train.max_steps=5"]), 32, max_iterations=10) == 2


def test_table_and_plot_of_trials(tmp_path):
    from pipelines.tune_report import TrialRow, pick_best, plot_metric_vs_params, write_table
    from pipelines.tune_space import load_space

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
