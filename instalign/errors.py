"""The one base class of every error a user can act on (a bad file, record, option or request).

Why one base: the ``instalign`` command has one catch site (:func:`pipelines.cli.main`) that
turns any user-facing error into the line ``instalign <verb>: <message>`` (and ``hint: …``
under it when the error has one) and exits with the error's :attr:`~InstAlignError.exit_code`;
a verb raises instead of printing and returning a status itself. A class that derives from
:class:`InstAlignError` is recognised there without being listed anywhere, and an exception
of any other class (a bug) keeps its traceback. ``tests/pipelines/test_cli_errors.py`` walks
``instalign`` and ``pipelines`` and fails on an error class without this base.

Subclasses keep their other bases (``ValueError``, ``FileNotFoundError``, MLflow's
``MlflowException`` …) after this one, so ``except ValueError`` and the HTTP status a server
derives from an ``MlflowException`` are what they were. This module imports nothing: the
model library may not depend on Ray, MLflow or ``pipelines``, and ``instalign --help`` stays
instant.
"""

from __future__ import annotations

from typing import Any

#: Exit status of a usage error (a missing or conflicting option), as argparse uses.
USAGE = 2


class InstAlignError(Exception):
    """A user-facing error: ``str(error)`` is the message, printed as one line by the CLI.

    Args:
        *args, **kwargs: what the next base class takes (the message first).
        exit_code: the CLI's exit status; 1 unless set (:data:`USAGE` for a usage error).
        hint: what to do about it, printed by the CLI as a second line ``hint: …``.
    """

    exit_code: int = 1
    hint: str | None = None

    def __init__(self, *args: Any, exit_code: int | None = None, hint: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if exit_code is not None:
            self.exit_code = exit_code
        if hint is not None:
            self.hint = hint
        if "message" not in self.__dict__:  # MlflowException and RequestError set their own
            self.message = str(self)


__all__ = ["InstAlignError", "USAGE"]
