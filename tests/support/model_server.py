"""A real ``mlflow models serve`` process on loopback, for the serving tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytest

from tests.support.serve_fixtures import free_port, post


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log_path: Path,
                 env: Optional[Mapping[str, str]] = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow models serve -m model_uri --env-manager local -h 127.0.0.1`` on a free port, one
    worker; yields ``(url, process)`` once ``/ping`` answers and stops its process group after."""
    port = free_port()
    full_env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1", **(env or {}))
    bin_dir = Path(sys.executable).parent
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env.get('PATH', '')}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"model server not ready on {url} after 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)  # a refused connection costs nothing: poll often, start sooner
        yield url, proc
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def invoke(url: str, columns: list[str], rows: list[list], timeout: float = 120) -> tuple[int, dict]:
    """POST a ``dataframe_split`` request; ``(status, JSON body)`` for answers and errors alike."""
    return post(f"{url}/invocations", {"dataframe_split": {"columns": columns, "data": rows}}, timeout=timeout)
