"""``instalign register``: a run's model or a checkpoint directory becomes a registered version with an alias.

* ``instalign register --run RUN_ID --alias champion [--name NAME]`` — the version that a
  training run registered (``instalign train --register-as``) gets the alias;
* ``instalign register --checkpoint DIR --name NAME --alias candidate`` — log a checkpoint
  directory as a new version directly (in a fresh MLflow run).

This alias moves with no evaluation: ``instalign promote`` is the gated way to ``@champion``.
"""

from __future__ import annotations

import argparse

import mlflow

from instalign.errors import USAGE, InstAlignError
from pipelines.core import flags
from pipelines.core.tracking import ensure_experiment
from pipelines.models.registry import log_and_register, promote_run
from pipelines.models.source import configure_tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_ID", help="promote the model version registered by this MLflow run")
    src.add_argument("--checkpoint", metavar="DIR", help="log and register this checkpoint directory")
    parser.add_argument("--name", help="registered model name (required with --checkpoint; picks one with --run)")
    parser.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    flags.add_tracking(parser, experiment="instalign")  # --experiment: where a --checkpoint's run goes


def run(args: argparse.Namespace) -> int:
    uri = configure_tracking(args.tracking_uri)
    if args.run:
        version = promote_run(args.run, alias=args.alias, name=args.name)
    else:
        if not args.name:
            raise InstAlignError("--checkpoint needs --name", exit_code=USAGE)
        # Not MLflow's Default experiment: a sqlite store created by this command would
        # give it ./mlruns of the current directory, and the model's files would land there.
        mlflow.set_experiment(experiment_id=ensure_experiment(uri, args.experiment))
        version = log_and_register(args.checkpoint, registered_model_name=args.name, alias=args.alias)
    print(f"models:/{version.name}@{args.alias} -> version {version.version} (run {version.run_id}; {uri})")
    return 0
