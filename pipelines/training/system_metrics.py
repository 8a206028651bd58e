"""This machine's CPU, memory, disk, network and GPU use as metrics of a training run.

Local rank 0 of each training node runs :func:`system_metrics` around its training loop
(``pipelines.training.worker``), so a run on a cluster has one set of curves per node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

log = logging.getLogger(__name__)

#: Seconds between samples of the system-metrics monitor, and samples averaged per logged point
#: (one point a minute by default: a long run stays a few thousand points per metric).
SYSTEM_METRICS_INTERVAL_S = 10.0
SYSTEM_METRICS_SAMPLES = 6


@contextmanager
def system_metrics(run_id: str, tracking_uri: str, *, node_id: Optional[str] = None,
                   sampling_interval: float = SYSTEM_METRICS_INTERVAL_S,
                   samples_before_logging: int = SYSTEM_METRICS_SAMPLES) -> Iterator[Any]:
    """Log this machine's CPU, memory, disk, network and (NVIDIA) GPU use into run ``run_id``
    while the block runs: MLflow's ``SystemMetricsMonitor`` in a background thread.

    One monitor per node (local rank 0 of each node on a cluster): the metrics are named
    ``system/<node_id>/cpu_utilization_percentage``, ``.../system_memory_usage_megabytes``,
    ``.../gpu_0_utilization_percentage``, ... (``system/...`` without a node id). Steps continue
    from the run's last system-metrics step, so a resumed run's curves go on rather than
    restart at 0. The monitor stops by itself when the run is no longer ``RUNNING``.

    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` / ``..._SAMPLES_BEFORE_LOGGING`` override the
    arguments (MLflow's rule). Without ``psutil`` nothing is logged, with one warning: a
    missing monitoring package never stops training. Yields the monitor (or ``None``).
    """
    try:
        import psutil  # noqa: F401  (MLflow's CPU / memory monitor needs it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:
        log.warning("no system metrics for run %s: %s (pip install psutil)", run_id, e)
        yield None
        return
    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval,
                                   samples_before_logging=samples_before_logging, resume_logging=True,
                                   node_id=node_id, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()
