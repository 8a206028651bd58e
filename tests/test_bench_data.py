"""``instalign bench data``'s ratios: Ray path over plain path, from rows of one run (no Ray here)."""

from __future__ import annotations

import pytest

from pipelines.bench_data import _row, speed_ratios


def test_ratios_compare_the_ray_and_plain_rows_of_one_run():
    rows = [
        _row("prepare", "1 process, no Ray", dict(seconds=20.0, cpu_seconds=20.0, items=3000), 1, "images/s"),
        _row("prepare", "Ray Data (incl. Ray start)", dict(seconds=12.5, cpu_seconds=24.0, items=3000), 2,
             "images/s"),
        _row("loader 480²", "Ray Data → Batch on CPU, 2nd epoch", dict(seconds=10.0, cpu_seconds=19.0, items=1500),
             2, "samples/s"),
        _row("loader 480²", "1 process, no Ray: → Batch on CPU", dict(seconds=12.0, cpu_seconds=12.0, items=1500),
             1, "samples/s"),
    ]
    prepare, loader = speed_ratios(rows)
    assert prepare["what"].startswith("prepare") and prepare["ratio"] == pytest.approx(1.6)
    assert prepare["per_core_ratio"] == pytest.approx(0.8)
    assert loader["ratio"] == pytest.approx(1.2) and loader["per_core_ratio"] == pytest.approx(0.6)
    assert loader["unit"] == "samples/s"


def test_no_ratio_without_both_paths():
    rows = [_row("prepare", "Ray Data (incl. Ray start)", dict(seconds=1.0, cpu_seconds=1.0, items=10), 2,
                 "images/s")]
    assert speed_ratios(rows) == []
