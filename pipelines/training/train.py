"""``instalign train``: train InstAlign (§3.7, §4.1; DESIGN §2) on Ray Train, tracked in one MLflow run.

The verb and its Python entry point :func:`train` (the quickstart calls it too). The driver:

1. reads the dataset's manifest and checks the config against it (``pipelines.training.job.plan_data``)
   before any cluster starts;
2. connects to Ray (``pipelines.core.ray_cluster.init_ray``), plans the workers' CPUs / GPUs
   (``pipelines.core.resources.plan_workers``: GPU workers when the cluster has GPUs) and logs
   which device the run trains on;
3. opens the MLflow run — or finds it again by name — and assembles the
   ``pipelines.training.job.TrainJob``, which ``pipelines.training.job.run_job`` fits (each worker runs
   ``pipelines.training.worker.train_fn_per_worker``);
4. logs the best checkpoint into the run and optionally registers it (alias ``candidate``).

Resume. Re-running with the same ``--name`` (and storage path) resumes from the latest
usable checkpoint (``pipelines.training.resume.usable_checkpoint``), and the MLflow run is found
again by name. After a worker failure (``--max-failures``) Ray restarts the group from the
latest registered checkpoint through the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from instalign.config import Config, load_config
from instalign.data.parquet import read_manifest
from pipelines.core import flags, ray_cluster
from pipelines.core.resources import absolute_data_dir, cluster_totals, describe_workers, plan_workers, storage_root
from pipelines.core.tracking import MlflowTracker, log_checkpoint, resolve_tracking_uri, start_or_resume_run
from pipelines.training.job import TrainJob, best_checkpoint, check_data_order, plan_data, run_job

__all__ = ["train", "TrainResult", "add_arguments", "run"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished ``train`` returns."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    path: str  # the Ray run directory (checkpoints live under it)
    best_checkpoint: Optional[str]
    last_checkpoint: Optional[str]
    metrics: dict[str, Any] = field(default_factory=dict)  # rank 0's metrics at the last checkpoint
    resumed: bool = False
    registered_version: Optional[str] = None


def train(cfg: Config, data_dir: str, *, num_workers: int = 1, gpus_per_worker: Optional[float] = None,
          cpus_per_worker: Optional[float] = None, name: Optional[str] = None, storage_path: Optional[str] = None,
          experiment: str = "instalign", register_as: Optional[str] = None, max_failures: int = 2,
          tracking_uri: Optional[str] = None, address: Optional[str] = None, placement_strategy: str = "PACK",
          data_order: str = "streaming", callbacks: Optional[list] = None) -> TrainResult:
    """Train InstAlign on Ray Train, tracked in one MLflow run; resume if ``name`` ran before.

    Args:
        cfg: the resolved config.
        data_dir: a prepared dataset (``instalign prepare``); absolute paths or URIs reach workers.
        num_workers: data-parallel workers; ``train.batch_size`` must divide evenly among them.
        gpus_per_worker: GPUs (or a share of one) per worker, NCCL then; 0: CPU workers (gloo);
            ``None``: one GPU per worker when the cluster has GPUs, else CPU workers
            (``pipelines.core.resources.resolve_gpus_per_worker``). The choice is logged at the start.
        cpus_per_worker: default leaves a quarter of the cluster (at least one CPU) to Ray Data
            (``pipelines.core.resources.default_cpus_per_worker``).
        name: the run's name: Ray's run directory and the MLflow run's tag. The same name
            again resumes that run (default: a fresh timestamped name).
        storage_path: where Ray keeps run directories and checkpoints (shared storage on a
            multi-node cluster); default ``./ray_results``.
        experiment: the MLflow experiment.
        register_as: register the best checkpoint under this model name (alias ``candidate``).
        max_failures: worker-group restarts after failures (from the latest checkpoint).
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db`` (sqlite).
        address: a Ray cluster to join; default: a new private local one (``pipelines.core.ray_cluster``).
        placement_strategy: ``PACK`` (default) or ``SPREAD`` workers over nodes.
        data_order: ``streaming`` or ``ordered`` (``pipelines.training.worker``).
        callbacks: Ray Train ``UserCallback``-s.
    """
    data_order = check_data_order(data_order)
    data_dir = absolute_data_dir(data_dir)
    data = plan_data(cfg, data_dir, read_manifest(data_dir), num_workers)

    ray_cluster.init_ray(address)
    cluster = cluster_totals()
    resources = plan_workers(num_workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                             placement_strategy=placement_strategy, cluster=cluster)
    log.info(describe_workers(resources, cluster, requested_gpus=gpus_per_worker))
    name = name or f"instalign-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = resolve_tracking_uri(tracking_uri)
    run_id, resumed = start_or_resume_run(tracking_uri=tracking_uri, experiment=experiment, run_name=name)
    tracker = MlflowTracker(run_id=run_id, tracking_uri=tracking_uri, owns_run=True)
    try:
        job = TrainJob(config=cfg, data=data, run_name=name, resources=resources,
                       storage_path=storage_root(storage_path), tracking_uri=tracking_uri, mlflow_run_id=run_id,
                       data_order=data_order, max_failures=max_failures)
        result = run_job(job, tracker, callbacks=callbacks or ())
        best, last = best_checkpoint(result), result.checkpoint
        if best is not None:
            tracker.set_tags({"instalign.best_checkpoint": best.path})
            with best.as_directory() as ckpt_dir:
                log_checkpoint(tracker, ckpt_dir, "checkpoints/best")
        registered = _register(best, register_as, tracking_uri=tracking_uri, run_id=run_id)
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return TrainResult(run_name=name, mlflow_run_id=run_id, tracking_uri=tracking_uri, path=result.path,
                       best_checkpoint=best.path if best else None, last_checkpoint=last.path if last else None,
                       metrics=dict(result.metrics or {}), resumed=resumed, registered_version=registered)


def _register(best: Any, register_as: Optional[str], *, tracking_uri: str, run_id: str) -> Optional[str]:
    """Register ``best`` under ``register_as`` (alias ``candidate``); the version, or None."""
    if not register_as or best is None:
        return None
    # MLflow (~2 s to import, with the registry module): only a run that registers pays for it.
    import mlflow

    from pipelines.models.registry import log_and_register

    mlflow.set_tracking_uri(tracking_uri)
    with best.as_directory() as ckpt_dir:
        version = log_and_register(ckpt_dir, registered_model_name=register_as, alias="candidate", run_id=run_id)
    return str(version.version)


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser, default="paper")
    flags.add_data(parser)
    parser.add_argument("--num-workers", type=int, default=1, help="data-parallel workers")
    flags.add_worker_resources(parser)
    flags.add_address(parser)
    flags.add_run_name(parser, what="run")
    flags.add_tracking(parser, experiment="instalign")
    parser.add_argument("--register-as", default=None, help="register the best checkpoint under this model name")
    flags.add_max_failures(parser, default=2)
    parser.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK",
                                                                         "STRICT_SPREAD"])
    flags.add_data_order(parser)
    flags.add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    flags.setup_logging(args.log_level)
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.data, num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                   cpus_per_worker=args.cpus_per_worker, name=args.name,
                   storage_path=args.storage_path, experiment=args.experiment, register_as=args.register_as,
                   max_failures=args.max_failures, tracking_uri=args.tracking_uri, address=args.address,
                   placement_strategy=args.placement_strategy, data_order=args.data_order)
    summary = {k: v for k, v in result.metrics.items() if k.startswith("val_") or k in ("step", "epoch")}
    print(json.dumps({"run_name": result.run_name, "mlflow_run_id": result.mlflow_run_id, "resumed": result.resumed,
                      "best_checkpoint": result.best_checkpoint, "registered_version": result.registered_version,
                      "metrics": summary}, indent=2, default=str))
    return 0
