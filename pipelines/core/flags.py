"""Command-line flags shared by the verbs, each defined once (names, defaults, help).

A verb's ``add_arguments`` composes these; options only one verb has stay in that verb's
module. The defaults that differ between verbs (``--experiment``, ``--max-failures``,
``--config``) are arguments here, so the flag itself is still written once.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, get_args

from instalign.config import DataOrder
from pipelines.core import ray_logs

class DefaultsShown(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it in words.

    Left out: flags (a ``store_true`` is off unless given), ``None`` (the help says what
    happens when the option is absent) and required options.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: Optional[str] = None) -> None:
    """The verbs' log format on stderr at ``level`` (default INFO), and Ray's level with it.

    Ray's own loggers stay at WARNING unless ``level`` asks for more (``--log-level INFO`` or
    ``DEBUG``): :func:`pipelines.core.ray_logs.set_ray_log_level`, applied by ``init_ray``.
    """
    logging.basicConfig(level=level or logging.INFO, format=LOG_FORMAT)
    ray_logs.set_ray_log_level(level)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=None, type=str.upper, choices=LOG_LEVELS,
                        help="log level of instalign and of Ray's own logs "
                             "(default: INFO for instalign, WARNING for Ray)")


def add_config(parser: argparse.ArgumentParser, *, default: Optional[str] = "paper",
               help: str = "a preset (paper, tiny) or a YAML file") -> None:
    parser.add_argument("--config", default=default, help=help)


def add_overrides(parser: argparse.ArgumentParser,
                  help: str = "dotted overrides, e.g. model.num_queries=50 train.epochs=1") -> None:
    parser.add_argument("overrides", nargs="*", help=help)


MODEL_METAVAR = "DIR|models:/NAME@ALIAS|models:/NAME/VERSION"


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model``: a checkpoint directory or a registered model, the same name in every verb
    that reads one (``evaluate`` keeps its older ``--checkpoint`` as an alias)."""
    parser.add_argument("--model", "--checkpoint", dest="model", required=True, metavar=MODEL_METAVAR,
                        help="checkpoint directory or registered model (models:/NAME@ALIAS, models:/NAME/VERSION)")


def add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")


def add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a prepared dataset directory or URI (instalign prepare)")


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001); default: a private local one")


def add_tracking(parser: argparse.ArgumentParser, *, experiment: str) -> None:
    """``--experiment`` and ``--tracking-uri`` (MLflow)."""
    parser.add_argument("--experiment", default=experiment, help="MLflow experiment")
    add_tracking_uri(parser)


def add_run_name(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--name`` and ``--storage-path``: the Ray run (or search) and where Ray keeps it."""
    parser.add_argument("--name", default=None,
                        help=f"{what} name; the same name (and storage path) again resumes that {what}")
    parser.add_argument("--storage-path", default=None,
                        help=f"Ray storage for the {what} and its checkpoints, a directory or URI (./ray_results)")


def add_worker_resources(parser: argparse.ArgumentParser) -> None:
    """``--gpus-per-worker`` and ``--cpus-per-worker`` (``pipelines.core.resources``)."""
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per worker (default: 1 when the Ray cluster has GPUs, else 0; 0: train on CPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs per worker (default: 1 with GPUs, else a share that leaves a quarter "
                             "of the cluster to Ray Data)")


def add_max_failures(parser: argparse.ArgumentParser, *, default: int) -> None:
    parser.add_argument("--max-failures", type=int, default=default,
                        help="worker-group restarts after worker failures, from the latest checkpoint (-1: unlimited)")


def add_data_order(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-order", default="streaming", choices=list(get_args(DataOrder)),
                        help="streaming: any size, per-epoch reshuffle; ordered: reproducible for any worker count")
