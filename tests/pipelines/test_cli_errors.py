"""The ``instalign`` command turns user-facing errors into one line and exit 1, for every verb;
``--debug`` shows the traceback (issue 11, point 6). No Ray: ``prepare`` reads the release in a
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
    monkeypatch.setattr("pipelines.core.ray_cluster.init_ray", lambda *args, **kwargs: None)


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
    monkeypatch.setattr("pipelines.core.ray_cluster.init_ray", lambda *a, **k: pytest.fail("Ray started for nothing"))
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
