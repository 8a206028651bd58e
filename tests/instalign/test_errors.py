"""``InstAlignError``: the base of every user-facing error (exit status, hint) that leaves the
other bases of a subclass working as before. That every error class of the project has this
base is checked in ``tests/pipelines/test_cli_errors.py``, beside the one place that prints them."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from instalign.errors import USAGE, InstAlignError

REPO = Path(__file__).resolve().parents[2]


def test_message_exit_code_and_hint():
    plain = InstAlignError("--out: exists")
    assert (str(plain), plain.message, plain.exit_code, plain.hint) == ("--out: exists", "--out: exists", 1, None)
    usage = InstAlignError("--checkpoint needs --name", exit_code=USAGE, hint="add --name NAME")
    assert (usage.exit_code, usage.hint) == (2, "add --name NAME")


def test_a_subclass_keeps_its_other_base():
    class Missing(InstAlignError, FileNotFoundError):
        pass

    e = Missing(2, "No such file or directory", "/nope")
    assert isinstance(e, FileNotFoundError) and (e.errno, e.filename) == (2, "/nope")
    assert e.message == str(e) == "[Errno 2] No such file or directory: '/nope'"
    from instalign.config import ConfigError

    with pytest.raises(ValueError, match="lr: must be > 0"):  # ``except ValueError`` still catches it
        raise ConfigError("lr: must be > 0")


def test_a_class_sets_its_own_exit_code():
    class Usage(InstAlignError):
        exit_code = USAGE

    assert Usage("x").exit_code == 2 and Usage("x", exit_code=3).exit_code == 3 and Usage("y").exit_code == 2


def test_an_mlflow_exception_keeps_its_code_and_http_status():
    from pipelines.models.limits import PyfuncInputError, RequestTooLarge, ServerBusy

    assert PyfuncInputError("row 0: bad").get_http_status_code() == 400
    assert RequestTooLarge("too big").get_http_status_code() == 413
    assert ServerBusy("busy").get_http_status_code() == 503
    e = PyfuncInputError("row 0: bad")
    assert e.message == "row 0: bad" and e.error_code == "INVALID_PARAMETER_VALUE" and e.json_kwargs == {}


def test_pickles_with_its_exit_code_and_hint():
    """Ray sends a task's exception to the driver pickled: what the CLI prints must survive it."""
    back = pickle.loads(pickle.dumps(InstAlignError("bad row", exit_code=2, hint="fix it")))
    assert (str(back), back.exit_code, back.hint, back.message) == ("bad row", 2, "fix it", "bad row")


def test_importing_it_imports_nothing_heavy():
    code = "import sys, instalign.errors; print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pipelines') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
