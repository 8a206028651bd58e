"""Connecting to Ray the same way from every entry point (train, evaluate, tune, prepare, quickstart).

Which cluster, chosen by ``--address`` — never by accident:

* **no address** — start a **private** single-node cluster for this process
  (``ray.init(address="local")``), and say so. A plain ``ray.init()`` would silently join
  any cluster already running on the machine (another user's job, a test's) and compete
  with its jobs for CPUs; that hung a Tune search for 14 minutes without a word.
* **an address** (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``), or ``RAY_ADDRESS`` in
  the environment (a Ray Job's entrypoint gets it) — join that cluster as it is configured;
  nothing about its security is changed from here.

Security of the private cluster: Ray's GCS, raylet and workers listen on every network
interface (Ray 2.60 has no switch to bind them all to loopback), so the cluster keeps Ray's
token authentication (``RAY_AUTH_MODE=token``, the token in ``~/.ray/auth_token``,
generated on first use): a process on another host that can route to this one cannot
connect without the token. The dashboard, which Ray Train V2 needs for its State API
(without it finished runs leak placement groups), listens on loopback only. Authentication
is never switched off here; a ``RAY_AUTH_MODE=disabled`` set by the user in the
environment is obeyed with a warning. Token mode is asked for explicitly
(:func:`private_cluster_auth`), not left to Ray's default (on for a new local cluster only
from Ray 2.59), and the mode Ray then reports is what the log line says. A Ray without
token authentication (before :data:`TOKEN_AUTH_MIN_RAY`) is refused rather than started
open: its cluster would accept any process on the network, and a line saying so is easy
to miss in a run's log.

What the user sees of Ray's own output (log levels, dropped lines, progress bars) is
``pipelines.core.ray_logs``, set up by :func:`init_ray`.

Also :class:`ResourceWaitReporter`, which says what a run waits for when it waits. The CPU
arithmetic that keeps Ray Train from starving Ray Data is ``pipelines.core.resources``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import ray
from packaging.version import InvalidVersion, Version

from pipelines.core import ray_logs
from instalign.errors import InstAlignError
from pipelines.core.ray_logs import IGNORED_WARNINGS, LOG_LEVEL_ENV, ray_log_level

# Ray's private (``ray._raylet``) and optional (``ray.util.state``, from ray[default]) modules are
# imported where used: a Ray without them still starts, and the code there says what it does then.


log = logging.getLogger(__name__)

#: Environment of a private local cluster; never applied when joining a cluster.
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report from a private run (and none offline)
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}

#: Variables forwarded from the driver to Train workers when set. Workers of an already
#: running cluster inherit the environment of whoever started that cluster, not ours.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_TRACKING_URI",
    "GIT_PYTHON_REFRESH",
    LOG_LEVEL_ENV,  # Ray's log level (--log-level)
    "RAY_DATA_LOG_LEVEL",
)


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
             runtime_env: Optional[Mapping[str, Any]] = None, data_only: bool = False) -> None:
    """Connect this process to Ray: join ``address`` or start a private local cluster.

    A process that is already connected (a test fixture, a notebook, a Tune trial) is left
    as it is: Ray allows one connection per process and re-initialising would drop the caller's.

    Args:
        address: ``None`` to start a private local cluster (unless ``RAY_ADDRESS`` is set);
            ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` to join a running one.
        num_cpus: CPUs a local cluster advertises (default: all); ignored when joining.
        runtime_env: Ray runtime environment for this job (``env_vars``, ``working_dir``...).
        data_only: the job runs Ray Data and nothing else (``prepare``, ``evaluate``, batch
            ``predict``): a private cluster then starts lean — without the dashboard's modules,
            which only Ray Train's State API needs, and without a job runtime environment
            (``ray_logs.setup_worker_logging`` configures Train's loggers; the cluster's workers
            inherit this process's environment, log levels included). On 2 cores the two
            together cost a 3,000-image ``prepare`` ~3.5 s of 15 (the dashboard's nine
            processes ~1.5 CPU-s; docs/performance.md). Ignored when joining a cluster.

    Ray's loggers follow ``pipelines.core.ray_logs.set_ray_log_level``; the lines Ray prints on
    every run that nobody can act on are dropped there too.
    """
    ray_logs.skip_known_worker_lines()
    ray_logs.ignore_known_warnings()
    if ray.is_initialized():
        log.info("Ray already initialised; reusing the current connection")
        return
    if not sys.stdout.isatty():  # a log file: no colour codes around the workers' line prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    ray_logs.plain_repeat_notes()
    ray_logs.show_progress_bars(sys.stderr.isatty())
    os.environ.setdefault(LOG_LEVEL_ENV, ray_log_level())
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", ray_log_level())
    job_env = {"worker_process_setup_hook": f"{ray_logs.__name__}.setup_worker_logging", **dict(runtime_env or {})}
    common: dict[str, Any] = dict(runtime_env=job_env, logging_level=ray_log_level(), log_to_driver=True)
    ray_logs.apply_ray_log_level()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **common)
        ray_logs.apply_ray_log_level()
        _route_data_advisory(data_only)
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    warnings_env = os.environ.get("PYTHONWARNINGS", "")
    if IGNORED_WARNINGS not in warnings_env:  # inherited by the cluster's processes
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warnings_env, IGNORED_WARNINGS]))
    mode = private_cluster_auth()
    log.info("starting a private local Ray cluster %s (pass --address auto or HOST:PORT to use a running one)",
             "with token authentication" if mode == "token" else "WITHOUT authentication")
    # The dashboard serves Ray's State API, which Train's placement-group cleaner (a detached
    # actor) must reach; with another Ray instance on the machine it cannot tell which one is
    # ours ("Found multiple active Ray instances") and the run's placement groups would leak.
    # So the port is chosen here and told to every process of the job. A data-only cluster
    # still runs Ray's minimal API server: on loopback, on a free port, too.
    port = free_port()
    if data_only and runtime_env is None:
        del common["runtime_env"]  # the workers inherit this process's environment
    elif not data_only:
        env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **job_env.get("env_vars", {})}
        common["runtime_env"] = {**job_env, "env_vars": env_vars}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=not data_only, dashboard_host="127.0.0.1",
             dashboard_port=port, **common)
    ray_logs.apply_ray_log_level()
    _route_data_advisory(data_only)


def _route_data_advisory(data_only: bool) -> Optional[str]:
    """A Ray Data job's driver (``data_only``: prepare, evaluate, batch predict) would print Ray
    core's actor-restart advisory once, as an ERROR line, for the first actor pool
    (:func:`ray_logs.route_actor_restart_advisory` says why nothing we pass avoids it): it goes
    to this session's Ray log folder instead, beside Ray's own logs. Training jobs create no such
    actor; the quickstart routes it into its workdir itself."""
    if not data_only:
        return None
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()  # Ray's session logs, on this host
    except AttributeError:  # not a local node (a Ray Client connection): nothing to route
        return None
    return ray_logs.route_actor_restart_advisory(logs)


#: The first Ray with token authentication (``RAY_AUTH_MODE=token``; Ray's docs, "Ray token
#: authentication": "available in Ray 2.52.0 or later"). Ray turns it on by itself for a new
#: local cluster only from 2.59, so :func:`private_cluster_auth` asks for it explicitly.
TOKEN_AUTH_MIN_RAY = "2.52.0"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


class RayVersionError(InstAlignError, RuntimeError):
    """The installed Ray cannot give a private cluster what it needs (token authentication)."""


def ray_supports_token_auth(version: str) -> bool:
    """Whether Ray ``version`` (``ray.__version__``) has token authentication."""
    try:
        return Version(version) >= Version(TOKEN_AUTH_MIN_RAY)
    except InvalidVersion:
        return False


def check_ray_version(version: str) -> None:
    """Refuse a Ray too old for token authentication, in one line the user can act on."""
    if not ray_supports_token_auth(version):
        raise RayVersionError(f"Ray {version} has no token authentication (Ray >= {TOKEN_AUTH_MIN_RAY} has): a private "
                              f"cluster would accept any process that can reach this machine. Upgrade Ray "
                              f"(pip install 'ray>={TOKEN_AUTH_MIN_RAY}'), or set {AUTH_MODE_ENV}=disabled to run "
                              f"it unauthenticated on a trusted network")


def auth_mode_in_effect() -> str:
    """The authentication mode Ray applies to a cluster this process starts: ``"token"``,
    ``"disabled"`` or ``"unknown"`` (a Ray that cannot say) — read from Ray, not from the
    environment, so a log line never claims a mode Ray did not take."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:
        return "unknown"
    mode = get_authentication_mode()
    return "token" if mode == AuthenticationMode.TOKEN else "disabled" if mode == AuthenticationMode.DISABLED \
        else "unknown"


def private_cluster_auth() -> str:
    """Set and check the authentication of a private cluster about to start; returns the mode.

    ``RAY_AUTH_MODE`` chosen by the user is obeyed (anything but ``token`` with a warning).
    Unset, token mode is set here — in the environment, which the cluster's processes
    inherit, and in Ray's configuration of this process, which Ray caches when it is first
    imported — and read back from Ray: a Ray that does not report token mode is refused
    (:class:`RayVersionError`).
    """
    chosen = os.environ.get(AUTH_MODE_ENV)
    wants_token = chosen is None or chosen.strip().lower() == "token"
    if wants_token:
        check_ray_version(ray.__version__)
        os.environ[AUTH_MODE_ENV] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")  # what Ray's own token default does: re-read RAY_AUTH_MODE in this process
    except (ImportError, AttributeError):
        pass
    mode = auth_mode_in_effect()
    if wants_token and mode != "token":
        raise RayVersionError(f"Ray {ray.__version__} did not turn token authentication on ({AUTH_MODE_ENV}=token "
                              f"gave mode {mode!r}); refusing to start an open private cluster")
    if mode != "token":
        log.warning("%s=%s is set: the private Ray cluster runs WITHOUT authentication while its ports listen on "
                    "every interface; unset it to keep Ray's token authentication", AUTH_MODE_ENV, chosen)
    return mode


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def forwarded_env(extra: Iterable[str] = ()) -> dict[str, str]:
    """The subset of :data:`FORWARDED_ENV` (plus ``extra``) set in this process."""
    keys = list(FORWARDED_ENV) + list(extra)
    return {k: os.environ[k] for k in keys if k in os.environ}


class ResourceWaitReporter:
    """Say what a run waits for when its workers or trials cannot be placed.

    A Train worker group or Tune trial whose resources the cluster cannot give waits
    silently and forever (a 2-node request on 1 node, GPUs on a CPU cluster, CPUs held by
    another job). This thread polls Ray's State API every ``every_s`` seconds; a placement
    group or actor pending for more than ``after_s`` seconds is logged at WARNING with what
    it asks for, beside what the cluster has free and in total — at most once per
    ``every_s``. Used as a context manager around ``fit()``.
    """

    def __init__(self, *, after_s: float = 60.0, every_s: float = 60.0, logger: logging.Logger = log) -> None:
        self.after_s, self.every_s, self.log = after_s, every_s, logger
        self._first_seen: dict[str, float] = {}
        self._last_report = -float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instalign-resource-waits", daemon=True)
        self.reports: list[str] = []

    def __enter__(self) -> "ResourceWaitReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _pending(self) -> dict[str, str]:
        """``{id: what it asks for}`` of pending placement groups and actors."""
        from ray.util.state import list_actors, list_placement_groups

        waiting = {}
        for pg in list_placement_groups(filters=[("state", "=", "PENDING")], detail=True, raise_on_missing_output=False):
            waiting[f"pg:{pg.placement_group_id}"] = (f"placement group {pg.name or pg.placement_group_id[:8]} "
                                                      f"({pg.topology_strategy or ''} bundles {pg.bundles})")
        for actor in list_actors(filters=[("state", "=", "PENDING_CREATION")], detail=True,
                                 raise_on_missing_output=False):
            waiting[f"actor:{actor.actor_id}"] = f"actor {actor.class_name} ({actor.required_resources})"
        return waiting

    def check_once(self, now: Optional[float] = None) -> Optional[str]:
        """One poll; returns (and logs) the report when something has waited too long."""
        now = time.monotonic() if now is None else now
        pending = self._pending()
        self._first_seen = {k: self._first_seen.get(k, now) for k in pending}
        late = {k: v for k, v in pending.items() if now - self._first_seen[k] >= self.after_s}
        if not late or now - self._last_report < self.every_s:
            return None
        self._last_report = now
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if not k.startswith("node:")}
        total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        waited = max(now - self._first_seen[k] for k in late)
        message = (f"waiting for resources for {waited:.0f} s: {'; '.join(sorted(late.values()))}. The cluster has "
                   f"{free} free of {total} ({len(ray.nodes())} node(s)). Free resources, add nodes, or ask for less "
                   f"(--num-workers, --cpus-per-worker, --gpus-per-worker).")
        self.log.warning(message)
        self.reports.append(message)
        return message

    def _run(self) -> None:
        while not self._stop.wait(min(10.0, self.after_s / 2, self.every_s)):
            try:
                self.check_once()
            except Exception as e:  # the State API can be briefly unavailable; never break the run
                self.log.debug("resource-wait check failed: %s", e)
