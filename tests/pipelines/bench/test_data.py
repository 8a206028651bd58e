"""``instalign bench data``'s ratios: Ray path over plain path, from rows of one run (no Ray here)."""

from __future__ import annotations

import pytest

from pipelines.bench.data import RUNNING_CLUSTER, speed_ratios, table_row


def test_ratios_compare_the_ray_and_plain_rows_of_one_run():
    rows = [
        table_row("prepare", "1 process, no Ray", dict(seconds=20.0, cpu_seconds=20.0, items=3000), 1, "images/s"),
        table_row("prepare", "Ray Data (incl. Ray start)", dict(seconds=12.5, cpu_seconds=24.0, items=3000), 2,
             "images/s"),
        table_row("loader 480²", "Ray Data → Batch on CPU, 2nd epoch", dict(seconds=10.0, cpu_seconds=19.0, items=1500),
             2, "samples/s"),
        table_row("loader 480²", "1 process, no Ray: → Batch on CPU", dict(seconds=12.0, cpu_seconds=12.0, items=1500),
             1, "samples/s"),
    ]
    prepare, loader = speed_ratios(rows)
    assert prepare["what"].startswith("prepare") and prepare["ratio"] == pytest.approx(1.6)
    assert prepare["per_core_ratio"] == pytest.approx(0.8)
    assert loader["ratio"] == pytest.approx(1.2) and loader["per_core_ratio"] == pytest.approx(0.6)
    assert loader["unit"] == "samples/s"


def test_no_ratio_without_both_paths():
    rows = [table_row("prepare", "Ray Data (incl. Ray start)", dict(seconds=1.0, cpu_seconds=1.0, items=10), 2,
                 "images/s")]
    assert speed_ratios(rows) == []


def test_the_running_cluster_row_gets_its_own_ratio():
    rows = [
        table_row("prepare", "1 process, no Ray", dict(seconds=20.0, cpu_seconds=20.0, items=3000), 1, "images/s"),
        table_row("prepare", "Ray Data (incl. Ray start)", dict(seconds=25.0, cpu_seconds=30.0, items=3000), 2,
             "images/s"),
        table_row("prepare", RUNNING_CLUSTER, dict(seconds=16.0, cpu_seconds=float("nan"), items=3000), 2, "images/s"),
    ]
    cold, job = speed_ratios(rows)
    assert cold["ratio"] == pytest.approx(0.8) and job["what"].startswith("prepare on a running cluster")
    assert job["ratio"] == pytest.approx(1.25) and job["per_core_ratio"] == pytest.approx(0.625, rel=1e-2)
    assert rows[2]["per_cpu_second"] != rows[2]["per_cpu_second"]  # NaN: the cluster's CPU was not counted

