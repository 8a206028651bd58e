"""The ``instalign`` command: one verb per pipeline stage (DESIGN §5).

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only routes, and imports a verb's module (and so Ray, MLflow, torch) when that
verb runs, so ``instalign --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("pipelines.quickstart", "synthetic data → prepare → train → evaluate → register → predict, locally"),
    "prepare": ("pipelines.prepare", "turn an official release into sharded Parquet (Ray Data)"),
    "train": ("pipelines.train", "train on Ray Train, tracked in MLflow"),
    "evaluate": ("pipelines.evaluate", "evaluate a checkpoint or registered model (Ray Data)"),
    "tune": ("pipelines.tune", "hyper-parameter search on Ray Tune"),
    "register": ("pipelines.registry", "register a run's model / set a registry alias"),
    "predict": ("pipelines.predict", "segment one image for one expression"),
    "synthetic": ("pipelines.synthetic", "write a synthetic dataset in the gRefCOCO on-disk format"),
    "bench": ("pipelines.bench", "benchmarks: model, data, predict"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instalign", description="Generalized referring segmentation with InstAlign.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:  # only the chosen verb's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv and argv[0] in VERBS else None
    args = build_parser(verb).parse_args(argv)
    if args.verb is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(VERBS[args.verb][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
