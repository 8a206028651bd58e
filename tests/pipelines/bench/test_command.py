"""``instalign bench`` (``pipelines.bench.command``): one verb, each benchmark's own parser."""

from __future__ import annotations

import pytest

from pipelines.bench.command import BENCHES, build_parser
from pipelines.cli import main


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_benchmark_has_its_own_parser(name):
    assert build_parser(name).format_usage().startswith(f"usage: instalign bench {name}")


def test_the_benchmarks_options_reach_its_module(tmp_path, capsys):
    # bench fuzz's own check of --examples runs: the options after the name were parsed by its parser.
    assert main(["bench", "fuzz", "--examples", "0", "--out", str(tmp_path)]) == 2  # a usage error
    assert "instalign bench: fuzz: --examples must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "fuzz", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
