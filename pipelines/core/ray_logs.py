"""What a user sees of Ray's own output: log levels, dropped lines, warnings, progress bars.

Rank 0's progress lines (``pipelines.training.progress``) are printed by a Train worker, so
worker output is forwarded to the driver (``log_to_driver``): to the terminal, and to ``ray job
logs`` on a cluster. Ray's own logs are held at WARNING unless ``--log-level`` asks for more
(:func:`set_ray_log_level`): the driver's ``ray`` loggers, Ray Train's
(``ray.train.LoggingConfig``, set by ``pipelines.training.job``) and Ray Data's
(``RAY_DATA_LOG_LEVEL``, which also sets the level of Ray Data's log file in the session
directory: pass ``--log-level DEBUG`` to debug Ray Data). Output that is not a terminal gets no
colour codes (``RAY_COLOR_PREFIX=0``) and no progress bars (:func:`show_progress_bars`); a
terminal keeps Ray Data's progress bars. Lines Ray prints on every normal run that a user
cannot act on are dropped (:func:`skip_known_worker_lines`, :data:`DROPPED_RECORDS`), and one
deprecation warning inside Ray Train (:data:`IGNORED_WARNINGS`); Ray core's advisory about
restartable actors, which Ray Data's actor pools trigger, goes to a file
(:func:`route_actor_restart_advisory`).

Nothing here runs on import: ``pipelines.core.ray_cluster.init_ray`` and the CLI
(``pipelines.cli``) call these functions when they set Ray up. Ray is imported only inside
the functions that need it: the CLI imports this module before a verb imports Ray, which
must not have read its settings yet (:func:`skip_known_worker_lines`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Optional

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
#: actors. And the raylet's first note that many worker processes started, on a node of one or
#: two CPUs: Ray expects at most as many starting workers as CPUs (``maximum_startup_concurrency``,
#: not settable from ``ray.init``) and warns at 4x, which Train's fractional-CPU workers, Ray
#: Data's tasks and helper actors reach on such a node by design (the quickstart on 2 cores: 8).
#: Its 5x and later notes, and any note on a bigger node, still show. Applied by
#: :func:`skip_known_worker_lines`; the lines stay in Ray's own logs (``raylet.err`` in the
#: session directory).
SKIP_WORKER_LINES = (r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"
                     r"|Failed to kill actor \w+, return status: Invalid: KillActor RPC failed .*Socket closed"
                     r"|WARNING: \d+ PYTHON worker processes have been started on node: .* which is 4x the maximum "
                     r"expected startup concurrency \([12]\)")
SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"


def skip_known_worker_lines() -> None:
    """The driver drops :data:`SKIP_WORKER_LINES` from the worker output it prints.

    Ray reads ``RAY_DEDUP_LOGS_SKIP_REGEX`` once, when ``ray`` is first imported, into the
    deduplicators that print worker lines (``ray._private.ray_logging``). So the variable is
    set (a user's own value wins), and where Ray is already imported without one its
    deduplicators take the pattern too; where Ray has no such objects nothing is changed.
    Idempotent: called by the CLI before a verb imports Ray and by ``init_ray``.
    """
    os.environ.setdefault(SKIP_ENV, SKIP_WORKER_LINES)
    ray_logging = sys.modules.get("ray._private.ray_logging")
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        dedup = getattr(ray_logging, name, None)
        if dedup is not None and getattr(dedup, "skip_re", False) is None:
            dedup.skip_re = re.compile(os.environ[SKIP_ENV])


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
#:   ``pipelines.core.ray_cluster.ResourceWaitReporter``.
#: * Ray's notice, as a private cluster starts, that token authentication is on and how to
#:   switch it off: ``init_ray`` says the cluster is private and authenticated itself,
#:   and switching authentication off is unsafe (``pipelines.core.ray_cluster``).
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

    Runs in every worker process of the job (``pipelines.core.ray_cluster.init_ray`` sets it) before
    any task or actor.
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


#: Where :func:`route_actor_restart_advisory` writes Ray core's advisory (in the directory it is given).
ADVISORY_LOG_NAME = "ray-driver-advisories.log"


def route_actor_restart_advisory(log_dir: str | os.PathLike) -> Optional[str]:
    """Ray core's actor-restart advisory goes to ``log_dir``/:data:`ADVISORY_LOG_NAME`, not the terminal.

    A driver that creates an actor which may restart and takes constructor arguments from the
    object store logs, once per process and from C++ straight to its stderr (no Python setting
    reaches it), ``ERROR … core_worker.cc: Actor with class name: … has constructor arguments in
    the object store and max_restarts > 0`` (ray-project/ray#53727). Ray Data 2.60 creates every
    actor-pool worker that way — its ``DataContext`` and transform go by reference, restarts on —
    so ``prepare``, ``evaluate`` and batch ``predict`` print it whatever they pass; Ray Data holds
    those objects for the whole run, so a restarted worker finds them, and nothing else here
    creates such actors. Turning restarts off would remove the cause, but a dead actor then hangs
    Ray Data (``tests/pipelines/data/test_prepare_streaming.py``). So the one line is spent here,
    on a placeholder actor that needs a resource no node has (never placed, no process; killed at
    once) while this process's stderr points at the file; the advisory keeps its text there.

    Call after ``ray.init`` in the driver, before any dataset runs. Returns the file's path, or
    ``None`` when Ray is not connected (nothing done).
    """
    import ray

    if not ray.is_initialized():
        return None
    path = os.path.join(os.fspath(log_dir), ADVISORY_LOG_NAME)

    @ray.remote(num_cpus=0, resources={"instalign-placeholder-never-placed": 1}, max_restarts=1)
    class _Placeholder:
        def __init__(self, _arg) -> None:
            pass

    arg = ray.put(b"")  # an argument in the object store: what the advisory is about
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log_file:
            os.dup2(log_file.fileno(), 2)
            try:
                placeholder = _Placeholder.remote(arg)  # Ray logs the advisory here, synchronously
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    ray.kill(placeholder, no_restart=True)
    return path
