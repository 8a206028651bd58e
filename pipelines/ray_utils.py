"""Connecting to Ray the same way from every entry point (train, evaluate, tune, tests).

Two cases, chosen by ``--address``:

* **no address** — start a private single-node cluster for this process. It is made quiet
  and offline-friendly (no usage stats, no progress bars, token auth off because nobody else
  can reach it), and the dashboard — which Ray Train V2 needs for its State API (without it
  finished runs leak placement groups) — listens on the loopback interface only, so a
  laptop run does not publish a control panel to the network.
* **an address** (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``) — join that cluster as
  it is configured; nothing about its security is changed from here.

Also the CPU arithmetic that keeps Ray Train from starving Ray Data: Train workers that
reserve every CPU leave no slot for the ``map_batches`` tasks that decode their input and
the run hangs forever (PLATFORM-FACTS, "Deadlock"); :func:`default_cpus_per_worker`
leaves room on purpose.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional

log = logging.getLogger(__name__)

#: Environment that makes a private local cluster quiet; never applied when joining a cluster.
LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",  # 2.60 default is token auth; a private loopback cluster needs none
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
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
    "INSTALIGN_TEST_FAIL_AT_STEP",
    "INSTALIGN_TEST_FAIL_MARKER",
)

#: Share of the cluster's CPUs kept free for Ray Data when sizing Train workers by default.
DATA_CPU_SHARE = 0.25


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
             runtime_env: Optional[Mapping[str, Any]] = None, quiet: bool = True) -> None:
    """Connect this process to Ray: join ``address`` or start a private local cluster.

    A process that is already connected (a test fixture, a notebook) is left as it is:
    Ray allows one connection per process and re-initialising would drop the caller's.

    Args:
        address: ``None`` to start a local cluster; ``"auto"``, ``"HOST:PORT"`` or
            ``"ray://HOST:PORT"`` to join a running one.
        num_cpus: CPUs a local cluster advertises (default: all); ignored when joining.
        runtime_env: Ray runtime environment for this job (``env_vars``, ``working_dir``...).
        quiet: log only errors from Ray and keep worker output off the driver's terminal.
    """
    import ray

    if ray.is_initialized():
        log.info("Ray already initialised; reusing the current connection")
        return
    common: dict[str, Any] = dict(runtime_env=dict(runtime_env) if runtime_env else None)
    if quiet:
        common.update(logging_level="ERROR", log_to_driver=False)
    if address:
        ray.init(address=address, **common)
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **common)


def forwarded_env(extra: Iterable[str] = ()) -> dict[str, str]:
    """The subset of :data:`FORWARDED_ENV` (plus ``extra``) set in this process."""
    keys = list(FORWARDED_ENV) + list(extra)
    return {k: os.environ[k] for k in keys if k in os.environ}


def cluster_cpus() -> float:
    """CPUs the connected cluster advertises in total (all nodes)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def default_cpus_per_worker(num_workers: int, *, total_cpus: Optional[float] = None,
                            use_gpu: bool = False) -> float:
    """CPUs per Train worker that leave a share of the cluster to Ray Data.

    GPU workers take 1 CPU each (the GPU does the work; the rest feeds it). CPU workers
    split what remains after keeping :data:`DATA_CPU_SHARE` (at least one CPU, on a
    2-CPU machine with two workers: 0.5 each) — at most 4 each, so a big node does not
    hand its whole budget to torch threads.

    Raises:
        ValueError: when the cluster has no CPU left for the workers at all.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    total = cluster_cpus() if total_cpus is None else float(total_cpus)
    if use_gpu:
        return 1.0
    reserve = max(1.0, DATA_CPU_SHARE * total)
    share = (total - reserve) / num_workers
    if share <= 0:
        # One CPU in total: workers still need a sliver to be scheduled; data gets the rest.
        share = total / (2 * num_workers)
    if share <= 0:
        raise ValueError(f"the Ray cluster advertises no CPUs (total {total}); cannot place {num_workers} workers")
    return round(min(4.0, share), 3)


def check_leaves_room_for_data(num_workers: int, cpus_per_worker: float, *, total_cpus: Optional[float] = None) -> None:
    """Refuse a request whose workers would take every CPU (Ray Data would then never run).

    A cluster-wide check only: Ray Data's Parquet read tasks ask for one whole CPU, so on
    nodes where the workers leave less than one free CPU the streaming train / val
    pipelines cannot be scheduled either (measured: a 2-node cluster of 1-CPU nodes with a
    0.5-CPU worker on each hangs in validation). Real nodes have CPUs to spare.
    """
    total = cluster_cpus() if total_cpus is None else float(total_cpus)
    taken = num_workers * cpus_per_worker
    if taken > total:
        raise ValueError(f"{num_workers} workers × {cpus_per_worker} CPUs = {taken} > the cluster's {total} CPUs")
    if taken >= total:
        raise ValueError(
            f"{num_workers} workers × {cpus_per_worker} CPUs take all {total} CPUs of the cluster: the Ray Data "
            "tasks that decode the training data could never be scheduled and the run would hang. "
            "Lower --cpus-per-worker (fractions are fine, e.g. 0.5) or add nodes.")
