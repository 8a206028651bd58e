"""The ``instalign`` command turns user-facing errors into one line (and a ``hint:`` line) and the
error's exit status, for every verb; ``--debug`` shows the traceback (issue 11, point 6; issue 27:
one base class, :class:`instalign.errors.InstAlignError`, for every error class of the project). No Ray: ``prepare`` reads the release in a
child process while Ray starts, so a bad release is reported once that start is done; here the
start is stubbed (:func:`stub_ray`), and the error line is what is checked. A real process,
with Ray's real start, is the last test."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.support.fixtures_official import write_grefcoco, write_refzom
from pipelines import cli
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stub_ray(monkeypatch):
    """Ray's start as a no-op: the release is refused before anything runs on Ray."""
    monkeypatch.setattr("pipelines.data.prepare.init_ray", lambda *args, **kwargs: None)  # prepare's own name for it


def _hostile_refzom(root: Path) -> Path:
    write_refzom(root)
    marker = root / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "ref-zom" / "refs(final).p").write_bytes(pickle.dumps([{"ref_id": 0, "x": Hostile()}], protocol=2))
    return marker


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_hostile_pickle_is_one_line(tmp_path, capsys, stub_ray):
    marker = _hostile_refzom(tmp_path)
    rc = main(["prepare", "--dataset", "refzom", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and line.startswith("instalign prepare: cannot read refzom from")
    assert "refs(final).p: refused to load global" in line and "system" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_deeply_nested_json_is_one_line(tmp_path, capsys, stub_ray):
    write_grefcoco(tmp_path)
    (tmp_path / "grefcoco" / "grefs(unc).json").write_text("[" * 50_000 + "]" * 50_000)
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "grefs(unc).json: JSON nested too deeply" in line


def test_id_beyond_int64_is_one_line(tmp_path, capsys, stub_ray):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    refs[2]["ann_id"] = [2 ** 64 + 5]
    path.write_text(json.dumps(refs))
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "ref #2 (ref_id=2): key 'ann_id' holds 18446744073709551621" in line


def test_a_missing_release_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pipelines.data.prepare.init_ray", lambda *a, **k: pytest.fail("Ray started for nothing"))
    (tmp_path / "grefcoco").mkdir()
    (tmp_path / "grefcoco" / "instances.json").mkdir()  # a directory where the file should be
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "o")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "gRefCOCO refs file not found" in line and "refs_file" in line
    (tmp_path / "grefcoco" / "grefs(unc).json").write_text("[]")
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "instances.json is not a regular file" in line


def test_a_reader_killed_midway_is_one_line(tmp_path, capsys, stub_ray, monkeypatch):
    """The forked reader dies (the kernel's OOM killer, say): one line naming the signal."""
    write_grefcoco(tmp_path)
    monkeypatch.setattr("pipelines.data.prepare.fork_is_safe", lambda: True)  # even if this process uses Ray
    monkeypatch.setattr("pipelines.data.prepare._read_and_plan", lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and line.startswith("instalign prepare: cannot read grefcoco from")
    assert "release reader process ended without an answer (killed by SIGKILL; out of memory?)" in line


def test_debug_shows_the_traceback(tmp_path, stub_ray):
    _hostile_refzom(tmp_path)
    from pipelines.data.prepare import PrepareError

    argv = ["prepare", "--dataset", "refzom", "--root", str(tmp_path), "--out", str(tmp_path / "out")]
    with pytest.raises(PrepareError, match="refused to load global"):
        main(argv + ["--debug"])
    with pytest.raises(PrepareError):
        main(["--debug"] + argv)


@pytest.mark.ray  # the real prepare starts its private Ray cluster (twice)
def test_real_process_exits_1_with_one_line(tmp_path):
    _hostile_refzom(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "pipelines.cli", "prepare", "--dataset", "refzom", "--root", str(tmp_path),
            "--out", str(tmp_path / "out")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert _one_line(proc.stderr).startswith("instalign prepare: cannot read refzom")
    proc = subprocess.run(argv + ["--debug"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UnsafePickleError" in proc.stderr


@pytest.fixture
def fake_verb(monkeypatch):
    """A verb ``boom`` whose ``run`` raises what the test puts in ``box['error']``."""
    box: dict = {}
    module = types.ModuleType("instalign_test_boom")
    module.add_arguments = lambda parser: parser.add_argument("--x", default="1")

    def run(args):
        raise box["error"]

    module.run = run
    monkeypatch.setitem(sys.modules, "instalign_test_boom", module)
    monkeypatch.setitem(cli.VERBS, "boom", ("instalign_test_boom", "raises"))
    return box


def test_project_errors_of_any_verb_are_one_line(fake_verb, capsys):
    from instalign.checkpoint import CheckpointError
    from instalign.config import ConfigError
    from instalign.data.safe_pickle import UnsafePickleError
    from pipelines.models.source import RegistryError

    for error in (CheckpointError("ckpt/config.yaml: empty file"), ConfigError("lr: must be > 0"),
                  RegistryError("no model 'x' with alias 'champion'"), UnsafePickleError("a.p: refused"),
                  FileNotFoundError(2, "No such file or directory", "/nope"), ValueError("bad --x")):
        fake_verb["error"] = error
        assert main(["boom"]) == 1
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("instalign boom: ") and str(error).splitlines()[0] in line, line


def test_bugs_keep_their_traceback(fake_verb):
    fake_verb["error"] = KeyError("a bug, not the user's input")
    with pytest.raises(KeyError):
        main(["boom"])
    fake_verb["error"] = RecursionError("a bug")
    with pytest.raises(RecursionError):
        main(["boom"])


def test_messages_are_redacted(fake_verb, capsys):
    fake_verb["error"] = ValueError("cannot open s3://AKIAEXAMPLE:hunter2@bucket/x?token=abc")
    assert main(["boom"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "hunter2" not in line and "abc" not in line and "s3://***@bucket/x?token=***" in line


def test_interrupt_is_one_line_and_130(fake_verb, capsys):
    fake_verb["error"] = KeyboardInterrupt()
    assert main(["boom"]) == 130
    assert _one_line(capsys.readouterr().err) == "instalign boom: interrupted"


def test_ray_task_errors_report_their_cause(fake_verb, capsys):
    from ray.exceptions import RayTaskError

    cause = ValueError("row 7: bad image")
    fake_verb["error"] = RayTaskError("fn", "Traceback (most recent call last):\n  ...\nValueError: row 7",
                                      cause).as_instanceof_cause()
    assert main(["boom"]) == 1
    assert _one_line(capsys.readouterr().err) == "instalign boom: row 7: bad image"


def test_error_classes_are_not_imported_to_be_recognised():
    code = ("import sys; from pipelines.cli import user_error_types; user_error_types(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'instalign.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed once the socket is: nothing listens there


@pytest.mark.parametrize("argv", [
    ["evaluate", "--model", "models:/m@champion", "--data", "/nonexistent/prepared"],
    ["predict", "--model", "models:/m@champion", "--image", "x.png", "--text", "the ball"],
    ["register", "--run", "0123abcd"],
], ids=["evaluate", "predict", "register"])
def test_a_password_in_the_tracking_uri_is_never_printed(tmp_path, argv):
    """The MLflow server is down: MLflow's error quotes the URI, and the verb reports it — redacted."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"http://user:SECRET@127.0.0.1:{_closed_port()}",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "SECRET" not in proc.stdout + proc.stderr
    assert f"instalign {argv[0]}: " in proc.stderr and "http://***@127.0.0.1:" in proc.stderr, proc.stderr[-2000:]


def test_everything_a_verb_prints_is_redacted(fake_verb, capsys, monkeypatch):
    """Not only the error line: a verb's results on stdout and its warnings on stderr too."""
    module = sys.modules["instalign_test_boom"]

    def run(args):
        print("models:/m@champion -> version 3 (tracking http://user:SECRET@host:5000)")
        print("instalign boom: cannot reach https://host/api?access_token=SECRET2", file=sys.stderr)
        return 0

    monkeypatch.setattr(module, "run", run)
    assert main(["boom"]) == 0
    out, err = capsys.readouterr()
    assert "SECRET" not in out + err and "http://***@host:5000" in out and "access_token=***" in err


def test_too_old_a_ray_is_one_line(fake_verb, capsys):
    from pipelines.core.ray_cluster import RayVersionError

    fake_verb["error"] = RayVersionError("Ray 2.40.0 has no token authentication (Ray >= 2.52.0 has): ...")
    assert main(["boom"]) == 1
    assert _one_line(capsys.readouterr().err).startswith("instalign boom: Ray 2.40.0 has no token authentication")


# --- one base class: InstAlignError (issue 27) ---------------------------------------------------

#: Exception classes of the project that never reach a user as they are, each with where it is
#: turned into a user-facing error. Any other exception class must derive from InstAlignError.
INTERNAL_ERRORS = {
    "pipelines.core.forked.ChildFailed": "pipelines.data.prepare reports it as a PrepareError",
    "pipelines.core.forked.RemoteTraceback": "the __cause__ carrying a child's traceback text, never raised alone",
    "pipelines.inference.decode.Rejected": "a row for the rejects table, caught in the decode stage",
    "pipelines.models.limits.FileTooLarge": "becomes a PyfuncInputError or a rejected row",
    "pipelines.serving.bounded_json.LimitExceeded": "becomes a 413 RequestError",
}


def _project_exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of ``instalign`` or ``pipelines`` (all imported)."""
    import importlib
    import pkgutil

    import instalign
    import pipelines

    found = {}
    for package in (instalign, pipelines):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_error_class_of_the_project_derives_from_instalign_error():
    from instalign.errors import InstAlignError

    classes = _project_exception_classes()
    assert "pipelines.data.records.PrepareError" in classes and "instalign.config_checks.ConfigError" in classes
    assert set(INTERNAL_ERRORS) <= set(classes), "stale INTERNAL_ERRORS entries"
    missing = sorted(n for n, cls in classes.items() if n not in INTERNAL_ERRORS and not issubclass(cls, InstAlignError))
    assert not missing, f"user-facing error classes without the InstAlignError base: {missing}"


def test_exit_code_and_hint(fake_verb, capsys):
    from instalign.errors import USAGE, InstAlignError

    fake_verb["error"] = InstAlignError("--checkpoint needs --name", exit_code=USAGE, hint="add --name NAME")
    assert main(["boom"]) == 2
    assert capsys.readouterr().err == "instalign boom: --checkpoint needs --name\nhint: add --name NAME\n"
    fake_verb["error"] = InstAlignError("no such run")
    assert main(["boom"]) == 1
    assert capsys.readouterr().err == "instalign boom: no such run\n"
    with pytest.raises(InstAlignError):
        main(["boom", "--debug"])


def test_a_hint_is_redacted_too(fake_verb, capsys):
    from instalign.errors import InstAlignError

    fake_verb["error"] = InstAlignError("cannot reach the server", hint="check http://user:SECRET@host:5000")
    assert main(["boom"]) == 1
    err = capsys.readouterr().err
    assert "SECRET" not in err and err.endswith("hint: check http://***@host:5000\n")


def test_a_ray_task_error_exits_with_its_causes_code(fake_verb, capsys):
    from ray.exceptions import RayTaskError

    from instalign.errors import InstAlignError

    cause = InstAlignError("row 7: bad option", exit_code=2)
    fake_verb["error"] = RayTaskError("fn", "Traceback ...", cause).as_instanceof_cause()
    assert main(["boom"]) == 2
    assert capsys.readouterr().err == "instalign boom: row 7: bad option\n"


@pytest.mark.parametrize("argv, status, line", [
    (["predict", "--model", "m"], 2,
     "instalign predict: give --image and --text (one image), or --data and --out (a dataset or table)"),
    (["predict", "--model", "m", "--data", "/nonexistent/d"], 2,
     "instalign predict: --data needs --out DIR (the output directory)"),
    (["register", "--checkpoint", "/nonexistent/ck"], 2, "instalign register: --checkpoint needs --name"),
    (["synthetic", "--out", "syn", "--num-images", "0"], 2, "instalign synthetic: num_images must be >= 1, got 0"),
    (["evaluate", "--model", "/nonexistent/ck", "--data", "/nonexistent/d", "--no-track"], 1,
     "instalign evaluate: checkpoint '/nonexistent/ck': not a directory (nor a models:/ URI)"),
    (["predict", "--model", "/nonexistent/ck", "--image", "x.png", "--text", "hi"], 1,
     "instalign predict: checkpoint '/nonexistent/ck': not a directory (nor a models:/ URI)"),
    (["serve", "--model", "/nonexistent/ck"], 1,
     "instalign serve: checkpoint '/nonexistent/ck': not a directory (nor a models:/ URI)"),
], ids=["predict-usage", "predict-data-no-out", "register-no-name", "synthetic-bad-count", "evaluate", "predict",
        "serve"])
def test_verbs_that_printed_their_own_error_now_raise_it(argv, status, line, tmp_path, capsys, monkeypatch):
    """Same line and status as when each verb printed it itself (measured on the old code); now
    raised, so ``--debug`` shows where (the old verbs printed the line even under ``--debug``)."""
    import re

    monkeypatch.chdir(tmp_path)  # the default MLflow store of a verb lands here, not in the checkout
    for module in ("pipelines.core.ray_cluster", "pipelines.evaluation.evaluate", "pipelines.inference.batch",
                   "pipelines.serving.serve"):  # the last three import init_ray at module level
        monkeypatch.setattr(f"{module}.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    assert main(argv) == status
    assert capsys.readouterr().err == line + "\n"
    with pytest.raises(Exception, match="^" + re.escape(line.split(": ", 1)[1])):
        main(argv + ["--debug"])
    assert not (tmp_path / "syn").exists()
