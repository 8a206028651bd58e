"""``instalign bench fuzz``: the trust boundaries fuzzed at scale, as a table.

Runs the property-based fuzz tests of a source checkout (``tests/**/test_fuzz_*.py``, built on
Hypothesis) in a child pytest with ``--examples`` cases per test instead of CI's few dozen,
in *tally* mode (``tests/support/fuzz_support.py``): no case fails the run; every case executed is
counted per boundary by what actually happened — a result, the boundary's clean refusal, an
exception outside its contract (a traceback), a 5xx answer, an interpreter crash, or data
read from outside its directory — with the first input of each bad kind and where it was
raised. The table is printed and written as ``fuzz.json`` and ``fuzz.md`` under ``--out``.

Generation is derandomised, so a run is reproducible for a given ``--examples`` and code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from instalign.errors import USAGE
from pipelines.bench.command import BenchError

REPO = Path(__file__).resolve().parents[2]
#: The environment variables ``tests/support/fuzz_support.py`` reads.
EXAMPLES_ENV, TALLY_ENV = "INSTALIGN_FUZZ_EXAMPLES", "INSTALIGN_FUZZ_TALLY"
#: Table columns: (key in the tally, heading).
COLUMNS = (("cases", "cases tried"), ("result", "results"), ("refusal", "clean refusals"),
           ("traceback", "tracebacks"), ("5xx", "5xx"), ("crash", "crashes"), ("escape", "data outside its directory"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", type=int, default=2000, help="cases per fuzz test [2000]")
    parser.add_argument("--out", default="bench-fuzz", help="directory for fuzz.json and fuzz.md [bench-fuzz]")
    parser.add_argument("-k", dest="keyword", default=None, help="only the fuzz tests pytest -k selects")


def fuzz_tests() -> list[Path]:
    """The fuzz test modules of this checkout; a clean exit when there is none (an installed wheel)."""
    files = sorted((REPO / "tests").rglob("test_fuzz_*.py"))
    if not files:
        raise BenchError(f"fuzz: no tests/**/test_fuzz_*.py under {REPO}; it runs from a source checkout")
    return files


def run_fuzz(examples: int, keyword: str | None = None) -> dict[str, Any]:
    """Run the fuzz tests in tally mode; the per-boundary tally, pytest's exit status and the times."""
    with tempfile.TemporaryDirectory(prefix="instalign-fuzz-") as tmp:
        tally = Path(tmp) / "tally.json"
        env = {**os.environ, EXAMPLES_ENV: str(examples), TALLY_ENV: str(tally)}
        # ``no:logging``: pytest's log capture keeps every record of a test, and one test here is
        # thousands of cases: 3 GB resident at 2,000 release cases with it, 0.3 GB without.
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
               "-W", "ignore::DeprecationWarning", "--show-capture=no", *map(str, fuzz_tests())] \
            + (["-k", keyword] if keyword else [])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        boundaries = json.loads(tally.read_text()) if tally.is_file() else {}
    return {"examples_per_test": examples, "pytest_exit": proc.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024),
            "boundaries": boundaries, "pytest_tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def markdown(report: dict[str, Any]) -> str:
    """The table, then the first input of every bad outcome."""
    lines = ["| boundary | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in sorted(report["boundaries"].items()):
        lines.append(f"| {name} | " + " | ".join(f"{row.get(k, 0):,}" for k, _ in COLUMNS) + " |")
    found = [(name, kind, ex) for name, row in sorted(report["boundaries"].items())
             for kind, ex in sorted(row.get("examples", {}).items())]
    if found:
        lines += ["", "First input of each bad outcome:", ""]
        lines += [f"- {name}, {kind}: `{ex['error'] or 'escaped'}` at {ex['where'] or '-'}; input `{ex['input'][:200]}`"
                  for name, kind, ex in found]
    lines += ["", f"{report['examples_per_test']:,} cases per test; {report['wall_s']} s wall, {report['cpu_s']} CPU-s, "
              f"{report['peak_rss_mb']} MB peak resident; "
              f"pytest exit status {report['pytest_exit']}."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.examples < 1:
        raise BenchError("fuzz: --examples must be >= 1", exit_code=USAGE)
    report = run_fuzz(args.examples, args.keyword)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "fuzz.json").write_text(json.dumps(report, indent=2))
    (out / "fuzz.md").write_text(table)
    print(table, end="")
    if report["pytest_exit"] != 0 or not report["boundaries"]:
        # Tally mode fails no case: a non-zero status is a harness error or a killed process (a crash).
        raise BenchError(f"fuzz: pytest exited with {report['pytest_exit']} (the table above is partial)",
                         hint=f"pytest's last lines: {report['pytest_tail']}")
    bad = sum(row.get(k, 0) for row in report["boundaries"].values() for k in ("traceback", "5xx", "crash", "escape"))
    return 1 if bad else 0
