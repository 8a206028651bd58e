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

What the user sees. Rank 0's progress lines (``pipelines.training.progress``) are printed by a Train
worker, so worker output is forwarded to the driver (``log_to_driver``): to the terminal, and
to ``ray job logs`` on a cluster. Ray's own logs are held at WARNING unless ``--log-level``
asks for more (:func:`set_ray_log_level`): the driver's ``ray`` loggers, Ray Train's
(``ray.train.LoggingConfig``, set by ``pipelines.training.job``) and Ray Data's (``RAY_DATA_LOG_LEVEL``,
which also sets the level of Ray Data's log file in the session directory: pass
``--log-level DEBUG`` to debug Ray Data). Output that is not a terminal gets no colour codes
(``RAY_COLOR_PREFIX=0``) and no progress bars (:func:`show_progress_bars`); a terminal keeps
Ray Data's progress bars. Lines Ray prints on every normal run that a user cannot act on
are dropped (:data:`SKIP_WORKER_LINES`, :data:`DROPPED_RECORDS`), and one
deprecation warning inside Ray Train (:data:`IGNORED_WARNINGS`).

Also :class:`ResourceWaitReporter`, which says what a run waits for when it waits. The CPU
arithmetic that keeps Ray Train from starving Ray Data is ``pipelines.core.resources``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional


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
    "INSTALIGN_RAY_LOG_LEVEL",  # LOG_LEVEL_ENV: Ray's log level (--log-level)
    "RAY_DATA_LOG_LEVEL",
)


#: Ray's loggers held at :func:`ray_log_level` (``ray.init`` sets the ``ray`` logger itself), and
#: tensorboardX's, which Tune's default TensorBoard callback drives (three INFO lines per trial
#: result: "Summary name ray/tune/val_Pr@0.7 is illegal", for every ``@`` in a metric name).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "tensorboardX")
#: Where the level lives: the environment, so a private cluster's processes inherit it.
LOG_LEVEL_ENV = "INSTALIGN_RAY_LOG_LEVEL"
#: Worker output the driver never prints (Ray's documented ``RAY_DEDUP_LOGS_SKIP_REGEX``), ERROR
#: lines of Ray's own on normal runs that nobody can act on: Ray Train V2's ``PreemptionWatcher``
#: actor keeps its constructor arguments in the object store while it may restart
#: (ray-project/ray#53727), logged in every run; and the GCS failing to kill an actor whose
#: process had already exited ("Socket closed"), a race when Train and Data tear down their
#: actors. Read by Ray when ``ray`` is first imported, so set here, on import of this module,
#: which ``pipelines.core.flags`` imports before anything imports Ray.
SKIP_WORKER_LINES = (r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"
                     r"|Failed to kill actor \w+, return status: Invalid: KillActor RPC failed .*Socket closed")
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", SKIP_WORKER_LINES)
#: A deprecation warning Ray Train's own ``DataConfig.default_ingest_options`` triggers in every
#: run (it passes ``exclude_resources`` on): in Train's controller, and in the driver when the
#: ``ordered`` data order builds ingest options (the quickstart). Ignored in the driver and in
#: the job's workers (:func:`ignore_known_warnings`), and through ``PYTHONWARNINGS`` in every
#: process of a private cluster.
IGNORED_WARNING_MESSAGE = "`ExecutionOptions.exclude_resources` is deprecated"
IGNORED_WARNINGS = f"ignore:{IGNORED_WARNING_MESSAGE}"


def ignore_known_warnings() -> None:
    """This process ignores :data:`IGNORED_WARNING_MESSAGE` (and only that warning)."""
    warnings.filterwarnings("ignore", message=re.escape(IGNORED_WARNING_MESSAGE))


def set_ray_log_level(level: Optional[str | int] = None) -> None:
    """``--log-level`` for Ray: its loggers at ``level`` (default WARNING) from now on.

    Kept in the environment (:data:`LOG_LEVEL_ENV`, and Ray Data's ``RAY_DATA_LOG_LEVEL``) so
    the processes of a private cluster started afterwards, and Tune trials, follow it.
    """
    name = "WARNING" if level is None else logging.getLevelName(level) if isinstance(level, int) else level.upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ValueError(f"log level {level!r}: expected one of DEBUG, INFO, WARNING, ERROR")
    os.environ[LOG_LEVEL_ENV] = name
    os.environ["RAY_DATA_LOG_LEVEL"] = name
    if "ray" in sys.modules:
        apply_ray_log_level()


def ray_log_level() -> str:
    """The level of Ray's own logs (:func:`set_ray_log_level`; WARNING unless asked)."""
    return os.environ.get(LOG_LEVEL_ENV, "WARNING")


def apply_ray_log_level() -> None:
    """Hold Ray's loggers of this process at :func:`ray_log_level`, and drop :data:`DROPPED_RECORDS`."""
    level = ray_log_level()
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name, marker in DROPPED_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropRecords) and f.marker == marker for f in logger.filters):
            logger.addFilter(DropRecords(marker))


#: Records of Ray's driver-side loggers dropped on every run (logger → text of the message):
#:
#: * Ray Data (``Dataset._execute``) warns once that "the Ray cluster currently does not have
#:   any available CPUs … will hang" when ``ray.available_resources()`` lists no free CPU as a
#:   dataset starts. The datasets of this project's jobs run on a cluster whose CPUs were
#:   planned for them (``pipelines.core.resources`` keeps a whole CPU, and each worker's fractional
#:   remainder, for Ray Data, and refuses plans that do not), so a momentarily full cluster
#:   means its own decode tasks are running, not a hang; a run that really waits is reported by
#:   :class:`ResourceWaitReporter`.
#: * Ray's notice, as a private cluster starts, that token authentication is on and how to
#:   switch it off: :func:`init_ray` says the cluster is private and authenticated itself,
#:   and switching authentication off is unsafe (module docstring).
#: * Ray Data's note, in each process that executes a dataset, that progress bars are off —
#:   they are off on purpose when the output is not a terminal (:func:`show_progress_bars`).
DROPPED_RECORDS = {
    "ray.data.dataset": "does not have any available CPUs",
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray.data._internal.progress": "Progress bars disabled",
}
#: Ray Train V2 logs every ``ray.train.report`` call at INFO ("Reporting training result …")
#: through a logger named after its source file, which ``ray.train.LoggingConfig`` misses.
TRAIN_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def train_report_logger_name() -> str:
    """The name of that logger — its file's path — found without importing ``ray.train``
    (``importlib.util.find_spec`` would import the package: ~0.8 CPU-s in every worker)."""
    import ray

    return os.path.join(os.path.dirname(ray.__file__), *TRAIN_REPORT_LOGGER_MODULE.split(".")[1:]) + ".py"


def setup_worker_logging() -> None:
    """``worker_process_setup_hook`` of the job's Ray processes: Ray's lines there as in the driver.

    Runs in every worker process of the job (``init_ray`` sets it) before any task or actor.
    """
    apply_ray_log_level()
    ignore_known_warnings()
    logging.getLogger(train_report_logger_name()).setLevel(ray_log_level())
    # MLflow's system-metrics monitor says at INFO, in every Train worker, that it starts,
    # skips GPU metrics and stops: library bookkeeping, not the run's progress.
    logging.getLogger("mlflow.system_metrics").setLevel(ray_log_level())


class DropRecords(logging.Filter):
    """A logger filter that drops the records whose message contains ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


def show_progress_bars(interactive: bool) -> None:
    """Ray Data's progress bars in an interactive terminal only; a log file gets no bars.

    Ray reads ``RAY_DATA_DISABLE_PROGRESS_BARS`` once, when ``ray.data`` is imported — often
    before a verb knows where its output goes — so the current ``DataContext`` (which travels
    with every dataset to the processes that execute it) is set as well.
    """
    if interactive:
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def plain_repeat_notes() -> None:
    """Ray's "[repeated 4x across cluster]" notes without colour codes when ``RAY_COLOR_PREFIX=0``.

    Ray's log deduplication appends that note to a worker line it saw several times, always in
    green (``ray._private.ray_logging._color``), whatever ``RAY_COLOR_PREFIX`` says: a log file
    got escape codes whenever the raylet repeated a warning (seen in CI: test_run_output). Ray
    has no setting for it, so with ``RAY_COLOR_PREFIX=0`` the note's colour function becomes
    the identity; where Ray has no such function, nothing is changed.
    """
    if os.environ.get("RAY_COLOR_PREFIX") != "0":
        return
    from ray._private import ray_logging

    if callable(getattr(ray_logging, "_color", None)):
        ray_logging._color = str


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
            (:func:`setup_worker_logging` configures Train's loggers; the cluster's workers
            inherit this process's environment, log levels included). On 2 cores the two
            together cost a 3,000-image ``prepare`` ~3.5 s of 15 (the dashboard's nine
            processes ~1.5 CPU-s; README, Performance). Ignored when joining a cluster.

    Ray's loggers follow :func:`set_ray_log_level` (module docstring: what the user sees).
    """
    import ray

    ignore_known_warnings()
    if ray.is_initialized():
        log.info("Ray already initialised; reusing the current connection")
        return
    if not sys.stdout.isatty():  # a log file: no colour codes around the workers' line prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    plain_repeat_notes()
    show_progress_bars(sys.stderr.isatty())
    os.environ.setdefault(LOG_LEVEL_ENV, ray_log_level())
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", ray_log_level())
    job_env = {"worker_process_setup_hook": f"{__name__}.setup_worker_logging", **dict(runtime_env or {})}
    common: dict[str, Any] = dict(runtime_env=job_env, logging_level=ray_log_level(), log_to_driver=True)
    apply_ray_log_level()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **common)
        apply_ray_log_level()
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
    apply_ray_log_level()


#: The first Ray with token authentication (``RAY_AUTH_MODE=token``; Ray's docs, "Ray token
#: authentication": "available in Ray 2.52.0 or later"). Ray turns it on by itself for a new
#: local cluster only from 2.59, so :func:`private_cluster_auth` asks for it explicitly.
TOKEN_AUTH_MIN_RAY = "2.52.0"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


class RayVersionError(RuntimeError):
    """The installed Ray cannot give a private cluster what it needs (token authentication)."""


def ray_supports_token_auth(version: str) -> bool:
    """Whether Ray ``version`` (``ray.__version__``) has token authentication."""
    from packaging.version import InvalidVersion, Version

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
    import ray

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
    import socket

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
        import ray

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
