"""``instalign bench {model,data,predict,fuzz,gpu}``: one verb, five benchmark modules.

Each benchmark lives in its own module (``pipelines.bench.model``, ``pipelines.bench.data``,
``pipelines.bench.predict``, ``pipelines.bench.fuzz``, ``pipelines.bench.gpu``) exposing ``add_arguments(parser)`` and ``run(args) -> int``,
like every verb of ``pipelines.cli``. Only the chosen benchmark's module is imported, so
``instalign bench predict`` does not pay for Ray Data and ``instalign bench --help`` is instant.
Speed targets live in these benchmarks and docs/performance.md, never in tests.
"""

from __future__ import annotations

import argparse
import importlib

from instalign.errors import InstAlignError
from pipelines.core import flags


class BenchError(InstAlignError, ValueError):
    """A benchmark that cannot run as asked (a bad option, nothing to run, no finite figure).

    The CLI prints it as ``instalign bench: <message>``; a bad option exits as a usage error.
    """


BENCHES: dict[str, tuple[str, str]] = {
    "model": ("pipelines.bench.model", "forward/backward step time and memory of the model"),
    "data": ("pipelines.bench.data", "Ray Data prepare/load throughput"),
    "predict": ("pipelines.bench.predict", "single-request latency and batched throughput of the predictor"),
    "fuzz": ("pipelines.bench.fuzz", "property-based fuzzing of the trust boundaries, tallied per boundary"),
    "gpu": ("pipelines.bench.gpu", "one JSON of the paper preset on one GPU: training samples/s eager and compiled, "
                                   "peak memory, inference pairs/s and p50/p99 latency"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The benchmark's own options are parsed in ``run`` by its module's parser: argparse
    # cannot add them lazily, and importing all five modules up front would cost seconds.
    parser.add_argument("bench", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the chosen benchmark (see --help)")


def build_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one benchmark, ``instalign bench NAME``."""
    module, help_text = BENCHES[name]
    parser = argparse.ArgumentParser(prog=f"instalign bench {name}", description=help_text,
                                     formatter_class=flags.DefaultsShown)
    importlib.import_module(module).add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    bench_args = build_parser(args.bench).parse_args(args.bench_args)
    return int(importlib.import_module(BENCHES[args.bench][0]).run(bench_args) or 0)
