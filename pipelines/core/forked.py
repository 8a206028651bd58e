"""One function call in a forked child process; its result, or its exception, comes back.

Why a process and not a thread: ``prepare`` reads and checks the release while Ray starts
(issue 16). In a thread of the driver the two share Python's one lock, and ``json.load`` of an
80 MB annotation file holds it for seconds at a time: measured at 10,000 images, Ray's start
went from 2.6 to 6.1 s and the reading from 3.7 to 5.0 s, so the overlap saved under a second.
A forked child has a lock of its own and the second core; only the result crosses, pickled
through a pipe (~0.3 s for the 10,000-image plan).

Why fork: the child starts in milliseconds with the parent's modules already imported (and,
in tests, the parent's monkeypatches). Fork is used only where it is safe (:func:`fork_is_safe`):
on Linux, before this process has connected to Ray — a Ray driver's threads do not exist in a
forked child, and its objects' finalisers would call into them. Elsewhere callers do the work
inline. The child ends with ``os._exit`` (``multiprocessing``'s fork start), so no ``atexit``
hook of the parent runs twice.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import sys
import traceback
from typing import Any, Callable


class ChildFailed(RuntimeError):
    """The child process ended without sending an answer (killed, out of memory)."""


class RemoteTraceback(Exception):
    """The child's traceback, as text: the ``__cause__`` of an exception raised there."""

    def __str__(self) -> str:
        return self.args[0]


def fork_is_safe() -> bool:
    """Linux, and this process not connected to Ray (module docstring)."""
    ray = sys.modules.get("ray")
    connected = ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()
    return sys.platform == "linux" and not connected


def _portable(exc: BaseException) -> tuple[BaseException, str]:
    """``exc`` as it can cross the pipe, with its traceback text."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception type that does not pickle: keep its words
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, text


def _run_child(sender: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        answer: tuple = (True, fn(*args), "")
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the parent
        answer = (False, *_portable(exc))
    try:
        sender.send(answer)
    except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
        sender.send((False, *_portable(RuntimeError(f"the result could not be sent back: {exc}"))))
    sender.close()


class ForkedCall:
    """``fn(*args)`` running in a forked child from construction on; :meth:`result` waits for it.

    Use it as a context manager: leaving the block early (an error, Ctrl-C) kills the child
    rather than waiting for work whose answer nobody will read.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str) -> None:
        context = multiprocessing.get_context("fork")
        self.name = name
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_run_child, args=(sender, fn, args), name=name, daemon=True)
        self._process.start()
        sender.close()  # the child holds the only writing end: its death shows here as EOF

    def result(self) -> Any:
        """The call's return value; its exception re-raised here, the child's traceback as the cause."""
        try:
            ok, value, text = self._receiver.recv()
        except EOFError:
            self._process.join()
            code = self._process.exitcode
            how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exit code {code}")
            raise ChildFailed(f"the {self.name} process ended without an answer ({how}; out of memory?)") from None
        finally:
            self._receiver.close()
        self._process.join()
        if ok:
            return value
        raise value from RemoteTraceback(text)

    def cancel(self) -> None:
        """Kill the child if it still runs."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._receiver.close()

    def __enter__(self) -> "ForkedCall":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


__all__ = ["ForkedCall", "ChildFailed", "RemoteTraceback", "fork_is_safe"]
