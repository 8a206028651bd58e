"""``pipelines.core.forked``: one call in a forked child, its answer or its failure brought back."""

from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest

from pipelines.core.forked import ChildFailed, ForkedCall, RemoteTraceback, fork_is_safe

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork is used on Linux only")


def _pid_and_sum(*xs):
    return os.getpid(), sum(xs)


def _fails(message):
    raise ValueError(message)


class _Unpicklable(Exception):
    def __init__(self, a, b):  # pickling rebuilds it with one argument: it cannot cross the pipe
        super().__init__(f"{a}/{b}")


def _fails_oddly():
    raise _Unpicklable("left", "right")


def _dies():
    os.kill(os.getpid(), signal.SIGKILL)


def _sleeps(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def test_the_answer_comes_from_another_process():
    with ForkedCall(_pid_and_sum, 1, 2, 3, name="adder") as call:
        pid, total = call.result()
    assert total == 6 and pid != os.getpid()


def test_the_childs_exception_is_raised_with_its_traceback():
    with ForkedCall(_fails, "bad release", name="reader") as call:
        with pytest.raises(ValueError, match="bad release") as err:
            call.result()
    cause = err.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "_fails" in str(cause) and "Traceback" in str(cause)


def test_an_exception_that_does_not_pickle_keeps_its_words():
    with ForkedCall(_fails_oddly, name="reader") as call:
        with pytest.raises(RuntimeError, match="_Unpicklable: left/right"):
            call.result()


def test_a_killed_child_is_an_error_that_says_so():
    with ForkedCall(_dies, name="release reader") as call:
        with pytest.raises(ChildFailed, match="release reader process ended without an answer .killed by SIGKILL"):
            call.result()


def test_leaving_early_kills_the_child(tmp_path):
    marker = tmp_path / "pid"
    with pytest.raises(KeyboardInterrupt):
        with ForkedCall(_sleeps, str(marker), name="sleeper"):
            deadline = time.time() + 30
            while not marker.exists() or not marker.read_text():
                assert time.time() < deadline
                time.sleep(0.01)
            raise KeyboardInterrupt
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
        os.kill(pid, 0)


def test_no_fork_once_this_process_is_connected_to_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert fork_is_safe()
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    assert not fork_is_safe()
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert not fork_is_safe()
