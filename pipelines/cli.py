"""The ``instalign`` command: one verb per pipeline stage (DESIGN §5).

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only routes, and imports a verb's module (and so Ray, MLflow, torch) when that
verb runs, so ``instalign --help`` stays instant.

Errors the user can act on — a bad file, a bad record, a wrong option — end as one message
``instalign <verb>: <what is wrong>`` on stderr, whichever verb raised them, and this is the one
place that prints them: a verb raises, it never prints its own error and returns a status. They
are every :class:`instalign.errors.InstAlignError` (the base of all the project's error classes;
its ``exit_code``, 1 or 2 for a usage error, is the exit status, and its ``hint`` a second line
``hint: …``), MLflow's ``MlflowException`` and the built-in errors that name a file or a value
(``FileNotFoundError``, ``PermissionError``, ``ValueError`` …; exit status 1). ``--debug``
(before or after the verb) shows the traceback instead. Anything else is a bug and keeps its
traceback. Everything a verb prints — these messages, its results, log lines, a ``--debug``
traceback — passes through :func:`pipelines.core.redaction.redacted_output`: an error that quotes
a URI never prints its credentials.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from instalign.errors import InstAlignError  # imports nothing: --help stays instant
from pipelines.core import flags  # the shared flags and their help format (~40 ms: no Ray, no torch)

VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("pipelines.quickstart", "synthetic data → prepare → train → evaluate → register → predict, locally"),
    "prepare": ("pipelines.data.prepare", "turn an official release into sharded Parquet (Ray Data)"),
    "train": ("pipelines.training.train", "train on Ray Train, tracked in MLflow"),
    "evaluate": ("pipelines.evaluation.evaluate", "evaluate a checkpoint or registered model (Ray Data)"),
    "tune": ("pipelines.tuning.tune", "hyper-parameter search on Ray Tune"),
    "register": ("pipelines.models.register", "register a run's model / set a registry alias"),
    "promote": ("pipelines.evaluation.promote", "move @champion to a version only if it beats the champion and the baselines"),
    "predict": ("pipelines.inference.predict", "segment one image for one expression, or a dataset/table with --data (Ray Data)"),
    "serve": ("pipelines.serving.serve", "serve a registered model on Ray Serve: /invocations (pyfunc JSON) and a page at /"),
    "synthetic": ("pipelines.data.synthetic", "write a synthetic dataset in the gRefCOCO on-disk format"),
    "bench": ("pipelines.bench.command", "benchmarks: model, data, predict"),
}

#: Built-in errors that, raised out of a verb, describe the input (a path, a value), not a bug.
BUILTIN_USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                        NotADirectoryError, ValueError)

DEBUG_HELP = "show the full traceback of an error instead of a one-line message"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instalign", description="Generalized referring segmentation with InstAlign.",
                                     formatter_class=flags.DefaultsShown)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=flags.DefaultsShown)
        if name == verb:  # only the chosen verb's module is imported
            importlib.import_module(module).add_arguments(p)
            flags.add_log_level(p)  # every verb: instalign's and Ray's logs (``main``)
        # SUPPRESS: when absent after the verb, the value given before it (or False) stands.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _cause(exc: BaseException) -> BaseException:
    """The user's error inside a Ray task error (``RayTaskError(ValueError)`` carries it as ``.cause``)."""
    while any(c.__name__ == "RayTaskError" for c in type(exc).__mro__) and isinstance(
            getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def user_error_types() -> tuple[type[BaseException], ...]:
    """:class:`InstAlignError`, :data:`BUILTIN_USER_ERRORS` and, once MLflow is loaded, its
    ``MlflowException`` (e.g. a registered model or alias that does not exist).

    MLflow's class is looked up in ``sys.modules``, never imported: an exception of a class
    whose module was never imported cannot have been raised, and ``--help`` stays instant.
    """
    mlflow_error = getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", None)
    return (InstAlignError, *BUILTIN_USER_ERRORS) + ((mlflow_error,) if isinstance(mlflow_error, type) else ())


def describe(exc: BaseException) -> tuple[str, int] | None:
    """What to print for ``exc`` (its message, and ``hint: …`` under it) and the exit status,
    if it is a user-facing error; else ``None`` (a bug)."""
    exc = _cause(exc)
    if not isinstance(exc, user_error_types()):
        return None
    text = str(exc).strip() or type(exc).__name__  # printed through pipelines.core.redaction (main)
    if not isinstance(exc, InstAlignError):
        return text, 1
    return (f"{text}\nhint: {exc.hint}" if exc.hint else text), exc.exit_code


def main(argv: list[str] | None = None) -> int:
    """``instalign VERB …``: the verb's exit status; all its output redacted (module docstring)."""
    from pipelines.core.redaction import redacted_output

    with redacted_output():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from pipelines.core.ray_logs import skip_known_worker_lines

    skip_known_worker_lines()  # before the verb's module imports Ray, which reads it then
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv and argv[0] in VERBS else next((a for a in argv if a in VERBS), None)
    args = build_parser(verb).parse_args(argv)
    if args.verb is None:
        build_parser().print_help()
        return 2
    if getattr(args, "log_level", None):  # asked for: before the verb's first log line and Ray's start
        flags.setup_logging(args.log_level)
    try:
        module = importlib.import_module(VERBS[args.verb][0])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"instalign {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a user-facing error
        described = None if args.debug else describe(exc)
        if described is None:
            raise
        text, status = described
        print(f"instalign {args.verb}: {text}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
