"""Which Ray cluster a verb uses, and whether strangers can use it.

* A verb without ``--address`` starts a private cluster even when another one runs on the
  machine (a plain ``ray.init()`` would join it and compete for its CPUs).
* That private cluster keeps Ray's token authentication: its ports listen on every
  interface (Ray 2.60 cannot bind them all to loopback), so the test lists every listening
  socket of the cluster's processes and proves that a client without the token cannot
  connect through a non-loopback one.
* Token mode is set explicitly (not left to Ray's default, on for local clusters only from
  2.59), the log line says the mode Ray reports, and a Ray without token authentication is
  refused: checked in fresh interpreters whose ``ray.init`` only records what it was given.
* A run whose workers cannot be placed says what it waits for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

#: Runs in a fresh interpreter with the user's environment (no test conveniences).
PRIVATE_CLUSTER = textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from pipelines.core.ray_cluster import init_ray
    init_ray(data_only=sys.argv[1] == "data_only")
    import ray
    ctx = ray.get_runtime_context()

    @ray.remote
    def worker_env():
        return os.environ.get("INSTALIGN_RAY_LOG_LEVEL")

    print(json.dumps({"gcs_address": ctx.gcs_address, "pid": os.getpid(),
                      "token": os.path.isfile(os.path.expanduser("~/.ray/auth_token")),
                      "runtime_env": sorted(ctx.runtime_env), "worker_log_level": ray.get(worker_env.remote())}),
          flush=True)
    sys.stdin.readline()  # hold the cluster until the test is done with it
    ray.shutdown()
""")

TOKENLESS_CLIENT = textwrap.dedent("""
    import sys, ray
    @ray.remote
    def f():
        return "ran"
    ray.init(address=sys.argv[1], logging_level="ERROR")
    print(ray.get(f.remote(), timeout=30))
""")


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parents.items() if pp == pid and p not in found]
        found.update(children)
        frontier.extend(children)
    return found


def _listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every listening TCP socket the given processes hold (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    sockets = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            if width == 8:
                address = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                address = ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
            sockets.append((address, int(hex_port, 16), inodes[inode]))
    return sockets


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("0000:0000:0000:0000:0000:0000:0000:0001",)


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["full", "data_only"])
def test_private_cluster_is_new_and_keeps_token_authentication(ray_local, tmp_path, kind):
    """The session's test cluster (``ray_local``) runs on this machine; the verb must not join it.

    ``data_only`` (prepare, evaluate, batch predict) is the lean cluster: no job runtime
    environment — its workers inherit the driver's environment, the log level with it — and
    the same authentication.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "INSTALIGN_RAY_LOG_LEVEL"}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", PRIVATE_CLUSTER, kind], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        info = json.loads(line)
        assert info["gcs_address"] != ray_local.get_runtime_context().gcs_address  # a new cluster, not ours
        assert info["token"]  # Ray generated the cluster's token in the user's home
        assert info["worker_log_level"] == "WARNING"
        if kind == "data_only":
            assert info["runtime_env"] == []
        else:
            assert "worker_process_setup_hook" in info["runtime_env"] and "env_vars" in info["runtime_env"]

        sockets = _listening_sockets(_descendants(info["pid"]))
        exposed = sorted({(a, p) for a, p, _ in sockets if not _is_loopback(a)})
        gcs_port = int(info["gcs_address"].rsplit(":", 1)[1])
        assert (("0.0.0.0", gcs_port) in exposed or any(p == gcs_port for _, p in exposed)), sockets
        # Every exposed port belongs to a cluster that demands the token: a client without it
        # (another home, authentication off on its side) cannot connect through the network address.
        host_ip = info["gcs_address"].rsplit(":", 1)[0]
        stranger = {k: v for k, v in env.items()}
        stranger.update(HOME=str(tmp_path / "stranger"), RAY_AUTH_MODE="disabled")
        attempt = subprocess.run([sys.executable, "-c", TOKENLESS_CLIENT, f"{host_ip}:{gcs_port}"], cwd=tmp_path,
                                 env=stranger, capture_output=True, text=True, timeout=180)
        assert "ran" not in attempt.stdout.split(), attempt.stdout
        assert attempt.returncode != 0
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = proc.stderr.read()
    assert "starting a private local Ray cluster with token authentication" in log


@pytest.mark.ray
def test_a_run_that_cannot_be_placed_says_what_it_waits_for(ray_local, caplog):
    import logging

    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.core.ray_cluster import ResourceWaitReporter

    pg = placement_group([{"CPU": 64}], name="too-big")  # the test cluster has 2 CPUs
    try:
        reporter = ResourceWaitReporter(after_s=0.0, every_s=0.0)
        with caplog.at_level(logging.WARNING, logger="pipelines.core.ray_cluster"):
            message = None
            for _ in range(20):  # the State API may take a moment to list the new group
                message = reporter.check_once()
                if message:
                    break
                import time

                time.sleep(0.5)
        assert message and "too-big" in message and "'CPU': 64" in message and "free of" in message
        assert message in caplog.text
    finally:
        remove_placement_group(pg)


#: ``init_ray()`` in a fresh interpreter, ``ray.init`` replaced by a recorder of the mode Ray
#: reports at that moment: what a new cluster would get, without starting one.
AUTH_CHOICE = textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import ray
    if sys.argv[1]:
        ray.__version__ = sys.argv[1]
    from pipelines.core import ray_cluster
    seen = {}
    ray.init = lambda *a, **k: seen.update(mode=ray_cluster.auth_mode_in_effect(), env=os.environ.get("RAY_AUTH_MODE"))
    try:
        ray_cluster.init_ray(data_only=True)
    except ray_cluster.RayVersionError as e:
        seen["refused"] = str(e)
    print(json.dumps(seen), flush=True)
""")


def _auth_choice(tmp_path, *, auth_mode=None, version=""):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    if auth_mode is not None:
        env["RAY_AUTH_MODE"] = auth_mode
    proc = subprocess.run([sys.executable, "-c", AUTH_CHOICE, version], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_token_mode_is_set_and_read_back(tmp_path):
    seen, log = _auth_choice(tmp_path)
    assert seen == {"mode": "token", "env": "token"}  # set here, and Ray reports it before the cluster starts
    assert "starting a private local Ray cluster with token authentication" in log
    assert "WARNING" not in log


def test_auth_disabled_by_the_user_is_obeyed_and_said(tmp_path):
    seen, log = _auth_choice(tmp_path, auth_mode="disabled")
    assert seen == {"mode": "disabled", "env": "disabled"}
    assert "WARNING pipelines.core.ray_cluster: RAY_AUTH_MODE=disabled is set: the private Ray cluster runs WITHOUT" in log
    assert "starting a private local Ray cluster WITHOUT authentication" in log
    assert "with token authentication" not in log


def test_a_ray_without_token_auth_is_refused(tmp_path):
    seen, log = _auth_choice(tmp_path, version="2.51.0")
    assert "mode" not in seen  # ray.init was never called
    assert seen["refused"].startswith("Ray 2.51.0 has no token authentication (Ray >= 2.52.0 has)")
    assert "RAY_AUTH_MODE=disabled" in seen["refused"] and "starting" not in log
    seen, log = _auth_choice(tmp_path, auth_mode="disabled", version="2.51.0")  # the user's explicit choice stands
    assert seen["env"] == "disabled" and "WITHOUT authentication" in log


@pytest.mark.parametrize("version, ok", [("2.40.0", False), ("2.51.9", False), ("2.52.0", True), ("2.52.0rc1", False),
                                         ("2.60.0", True), ("2.61.0.dev0", True), ("3.0.0", True), ("nightly", False)])
def test_token_auth_version_floor(version, ok):
    from pipelines.core.ray_cluster import RayVersionError, check_ray_version, ray_supports_token_auth

    assert ray_supports_token_auth(version) is ok
    if ok:
        check_ray_version(version)
    else:
        with pytest.raises(RayVersionError, match=f"Ray {version} has no token authentication"):
            check_ray_version(version)


def test_the_dependency_floor_is_the_token_auth_floor():
    import re

    from pipelines.core.ray_cluster import TOKEN_AUTH_MIN_RAY

    floor = re.search(r'"ray\[[^\]]*\]>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert floor and TOKEN_AUTH_MIN_RAY.startswith(floor.group(1)), floor
