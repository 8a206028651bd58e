"""``instalign bench fuzz`` (``pipelines.bench.fuzz``): a real child pytest over one small fuzz test
in tally mode, and the table it writes."""

from __future__ import annotations

import argparse
import json

import pytest

from pipelines.bench.command import BenchError

from pipelines.bench import fuzz


def test_the_fuzz_tests_of_the_checkout_are_found_anywhere_under_tests():
    names = {p.name for p in fuzz.fuzz_tests()}
    assert {"test_fuzz_images.py", "test_fuzz_release.py", "test_fuzz_paths.py", "test_fuzz_requests.py"} <= names


def test_a_small_run_tallies_every_case_and_writes_the_table(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    fuzz.add_arguments(parser)
    args = parser.parse_args(["--examples", "3", "--out", str(tmp_path / "out"),
                              "-k", "test_admitted_split_names_stay_one_level_under_out"])
    assert fuzz.run(args) == 0
    report = json.loads((tmp_path / "out" / "fuzz.json").read_text())
    assert report["pytest_exit"] == 0 and report["examples_per_test"] == 3
    (row,) = report["boundaries"].values()
    assert row["cases"] >= 3 and row["result"] + row["refusal"] == row["cases"]
    table = (tmp_path / "out" / "fuzz.md").read_text()
    assert table.startswith("| boundary | cases tried | results | clean refusals |") and table in capsys.readouterr().out


def test_the_table_names_the_first_input_of_each_bad_outcome():
    report = {"examples_per_test": 5, "wall_s": 1.0, "cpu_s": 0.5, "peak_rss_mb": 10, "pytest_exit": 0,
              "boundaries": {"serve": {"cases": 5, "result": 3, "5xx": 2, "examples": {
                  "5xx": {"error": "KeyError: 'x'", "where": "serve.py:10", "input": "{}"}}}}}
    table = fuzz.markdown(report)
    assert "| serve | 5 | 3 | 0 | 0 | 2 | 0 | 0 |" in table
    assert "- serve, 5xx: `KeyError: 'x'` at serve.py:10; input `{}`" in table


def test_no_examples_is_refused_in_one_line(tmp_path):
    with pytest.raises(BenchError, match="--examples must be >= 1"):
        fuzz.run(argparse.Namespace(examples=0, out=str(tmp_path), keyword=None))
