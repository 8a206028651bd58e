"""The per-node system-metrics monitor of a training run (``pipelines.training.system_metrics``),
against a real sqlite MLflow store."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from pipelines.core.tracking import start_or_resume_run


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_system_metrics_monitor_logs_into_the_run_per_node(store):
    """The per-node monitor a training node runs: ``system/<node>/...`` metrics reach the run;
    a second monitor (another node, or a restarted one) continues the run's steps."""
    from mlflow import MlflowClient

    from pipelines.training.system_metrics import system_metrics

    run_id, _ = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="sysmetrics")
    client = MlflowClient(tracking_uri=store)

    def monitor_until_logged(node: str) -> list[int]:
        key = f"system/{node}/cpu_utilization_percentage"
        with system_metrics(run_id, store, node_id=node, sampling_interval=0.2, samples_before_logging=1) as monitor:
            assert monitor is not None
            deadline = time.monotonic() + 60  # a bound for a loaded machine, not a timing
            while key not in client.get_run(run_id).data.metrics and time.monotonic() < deadline:
                time.sleep(0.2)
        return [m.step for m in client.get_metric_history(run_id, key)]

    first = monitor_until_logged("node_0")
    logged = set(client.get_run(run_id).data.metrics)
    assert first and {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes",
                      "system/node_0/system_memory_usage_percentage"} <= logged
    second = monitor_until_logged("node_1")
    assert second and min(second) > max(first)


def test_without_psutil_training_goes_on_with_one_warning(store, monkeypatch, caplog):
    from pipelines.training.system_metrics import system_metrics

    monkeypatch.setitem(sys.modules, "psutil", None)  # ``import psutil`` raises ImportError
    with caplog.at_level(logging.WARNING, logger="pipelines.training.system_metrics"):
        with system_metrics("r" * 32, store) as monitor:
            ran = True
    assert ran and monitor is None
    assert [r.getMessage() for r in caplog.records] == [
        f"no system metrics for run {'r' * 32}: import of psutil halted; None in sys.modules (pip install psutil)"]
