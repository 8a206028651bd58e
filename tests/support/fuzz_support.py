"""What the property-based fuzz tests (``tests/test_fuzz_*.py``) share: settings, outcomes, tallies.

Every fuzz case runs one call across a trust boundary through :func:`run_case`, which sorts
what happened into outcomes:

* ``result`` / ``refusal``: the contract — a value, or the boundary's own clean exception;
* ``traceback``: any other exception reached the caller (a stack trace in a log, a 400 with a
  stack trace from MLflow's scoring server, a failed ``prepare``);
* ``5xx``: an HTTP boundary would answer 5xx (a refusal with such a status, or an exception
  the handler does not catch, which FastAPI turns into a 500);
* ``crash``: the interpreter's limits were hit (``RecursionError``, ``MemoryError``,
  ``SystemError``); a process killed outright shows as pytest's own exit status instead;
* ``escape``: the call returned data from outside the directory it is confined to.

In a test run, any outcome but the first two fails the test (Hypothesis then shrinks the
input to a minimal one). ``instalign bench fuzz`` sets :data:`TALLY_ENV` instead: no case
fails, every case's outcomes are counted per boundary, with the first input of each bad
outcome, and written as JSON when the process exits, so the bench reports how many of N
cases went wrong rather than stopping at the first.

Case counts: :data:`DEFAULT_EXAMPLES` per test (CI), or :data:`EXAMPLES_ENV`. Generation is
derandomised and the example database off, so a CI run is reproducible.
"""

from __future__ import annotations

import atexit
import json
import os
import traceback
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, settings

EXAMPLES_ENV = "INSTALIGN_FUZZ_EXAMPLES"
TALLY_ENV = "INSTALIGN_FUZZ_TALLY"
DEFAULT_EXAMPLES = 60
OUTCOMES = ("result", "refusal", "traceback", "5xx", "crash", "escape")
BAD = ("traceback", "5xx", "crash", "escape")
_CRASHES = (RecursionError, MemoryError, SystemError)

TALLY_PATH = os.environ.get(TALLY_ENV) or None
_TALLY: dict[str, dict[str, Any]] = {}


def examples(default: int = DEFAULT_EXAMPLES) -> int:
    """Cases per test: :data:`EXAMPLES_ENV` when set, else ``default``."""
    return int(os.environ.get(EXAMPLES_ENV) or default)


def fuzz_settings(default: int = DEFAULT_EXAMPLES) -> settings:
    """Bounded, reproducible Hypothesis settings; no shrinking while tallying (nothing fails)."""
    phases = (Phase.explicit, Phase.generate) if TALLY_PATH else (Phase.explicit, Phase.generate, Phase.shrink)
    return settings(max_examples=examples(default), deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def _where(exc: BaseException) -> str:
    """``file:line`` where ``exc`` was raised, and the project frame it left through."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    raised = frames[-1]
    ours = [f for f in frames if "/instalign/" in f.filename or "/pipelines/" in f.filename]
    text = f"{_short(raised.filename)}:{raised.lineno}"
    if ours and ours[-1] is not raised:
        text += f" (via {_short(ours[-1].filename)}:{ours[-1].lineno})"
    return text


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _record(boundary: str, kinds: list[str], case: Any, exc: BaseException | None) -> None:
    entry = _TALLY.setdefault(boundary, {"cases": 0, **{k: 0 for k in OUTCOMES}, "examples": {}})
    entry["cases"] += 1
    for kind in kinds:
        entry[kind] += 1
        if kind in BAD and kind not in entry["examples"]:
            entry["examples"][kind] = {"input": repr(case)[:400], "where": _where(exc) if exc else "",
                                       "error": f"{type(exc).__name__}: {str(exc)[:300]}" if exc else ""}


def _dump() -> None:
    with open(TALLY_PATH, "w") as f:
        json.dump(_TALLY, f, indent=1)


if TALLY_PATH:
    atexit.register(_dump)


def run_case(boundary: str, case: Any, call: Callable[[], Any], *, refusals: tuple[type[BaseException], ...],
             status: Callable[[BaseException], int] | None = None, uncaught_status: int | None = None,
             escaped: Callable[[Any], str | None] = lambda result: None) -> Any:
    """Run ``call()`` for fuzz input ``case`` at ``boundary``; classify, count, and (tests) assert.

    Args:
        refusals: the boundary's clean refusal exceptions.
        status: the HTTP status a refusal is answered with (HTTP boundaries only).
        uncaught_status: the status of any other exception at an HTTP boundary (500: FastAPI).
        escaped: a description of how ``result`` came from outside its directory, or ``None``.
    """
    exc: BaseException | None = None
    result = None
    try:
        result = call()
    except refusals as e:
        exc = e
        kinds = ["refusal"] + (["5xx"] if status is not None and status(e) >= 500 else [])
    except _CRASHES as e:
        exc, kinds = e, ["crash"]
    except Exception as e:  # noqa: BLE001 - this is what the fuzzing looks for
        exc = e
        kinds = ["traceback"] + (["5xx"] if uncaught_status is not None and uncaught_status >= 500 else [])
    else:
        how = escaped(result)
        kinds = ["escape"] if how else ["result"]
    if TALLY_PATH:
        _record(boundary, kinds, case, exc)
        return result
    bad = [k for k in kinds if k in BAD]
    if bad:
        detail = f"{type(exc).__name__}: {exc} at {_where(exc)}" if exc else escaped(result)
        raise AssertionError(f"{boundary}: {'/'.join(bad)} for input {case!r:.600}: {detail}") from exc
    return result
