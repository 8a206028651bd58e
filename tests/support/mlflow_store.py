"""A temporary MLflow tracking store for a test, with MLflow's process-wide state put back.

``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` change state that outlives a test:
the tracking URI, the active experiment id and ``$MLFLOW_EXPERIMENT_ID``. Left behind, a later
test file's ``mlflow.start_run`` on its own store looks for this store's experiment id and
fails ("No Experiment with id=2 exists"), depending on the order the files ran in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tracking_store(root: Path, experiment: str) -> Iterator[str]:
    """MLflow pointed at a new sqlite store ``root/mlflow.db`` and its experiment ``experiment``.

    The experiment keeps its artifacts beside the database (``ensure_experiment``), never in
    ``./mlruns`` of the working directory. Yields the tracking URI; on exit the tracking URI, the
    active experiment and ``$MLFLOW_EXPERIMENT_ID`` are what they were before.
    """
    import mlflow
    from mlflow.tracking import fluent

    from pipelines.core.tracking import ensure_experiment

    uri = f"sqlite:///{Path(root) / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=ensure_experiment(uri, experiment))
        yield uri
    finally:
        mlflow.set_tracking_uri(before[0])
        fluent._active_experiment_id = before[1]
        if before[2] is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before[2]
