"""The training-job core: one place where a training job is assembled and run on Ray Train.

``instalign train`` (``pipelines.training.train``), every Tune trial (``pipelines.tuning.trial``) and
the quickstart (through ``pipelines.training.train.train``) all come here:

1. :func:`plan_data` checks a config against a prepared dataset — the split exists, the
   global batch splits evenly over the workers and fits the data — before any cluster starts;
2. a :class:`TrainJob` holds everything else a run needs, decided once by the caller: the
   config (a ``Config`` dataclass, validated when it was built, its ``auto`` values worked
   out from the dataset's manifest by :func:`resolve_data_options`), the data plan, the
   resources (``pipelines.core.resources``), where Ray stores the run, the MLflow run it is
   tracked in and the data order;
3. :func:`run_job` logs the job's inputs into its MLflow run, builds the Ray Datasets
   (``pipelines.data.loader``) and the ``TorchTrainer`` around ``pipelines.training.worker``, and fits it.

Opening and closing the MLflow run, registration and Tune's reporting are the callers'.
Resume: a job whose ``run_name`` ran before (same storage) resumes from its latest
checkpoint — Ray V2 resumes when a trainer is built again with the same ``RunConfig``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, get_args

import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from instalign.checkpoint import CheckpointError, checkpoint_files
from instalign.config import Config, DataOrder, apply_overrides
from instalign.losses import balanced_nt_pos_weight
from pipelines.core.ray_cluster import ResourceWaitReporter, forwarded_env
from pipelines.core.ray_logs import ray_log_level
from pipelines.core.resources import WorkerResources
from pipelines.data.loader import load_samples
from pipelines.training.observers import OBSERVER_ENV, SCORE_METRIC
from pipelines.training.run_inputs import log_run_inputs
from pipelines.training.worker import RunSpec, loop_config, train_fn_per_worker

log = logging.getLogger(__name__)

DATA_ORDERS: tuple[str, ...] = get_args(DataOrder)


def check_data_order(value: str) -> DataOrder:
    """``value`` as a :data:`instalign.config.DataOrder`, or a one-line error.

    The one check, made where the value enters (``train``, ``tune``: the Python API; the CLI's
    ``--data-order`` has the same choices): everything after it holds a ``DataOrder``.
    """
    if value not in DATA_ORDERS:
        raise ValueError(f"data_order={value!r}: expected one of {DATA_ORDERS}")
    return value  # type: ignore[return-value]  # checked just above


@dataclass(frozen=True)
class DataPlan:
    """A config's view of a prepared dataset: where it is, its manifest, and the samples a run sees."""

    data_dir: str
    manifest: Mapping[str, Any]
    train_samples: int
    val_samples: int
    steps_per_epoch: int


@dataclass
class TrainJob:
    """One training job, assembled once by its caller and run by :func:`run_job`."""

    config: Config
    data: DataPlan
    run_name: str
    resources: WorkerResources
    storage_path: str  # ``pipelines.core.resources.storage_root``: absolute, or a URI
    tracking_uri: str
    mlflow_run_id: str
    data_order: DataOrder = "streaming"
    max_failures: int = 2

    #: What :func:`resolve_data_options` worked out, ``{config key: how}``; logged as tags.
    derived: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config, derived = resolve_data_options(self.config, self.data.manifest)
        self.derived = {**derived, **self.derived}

    def run_spec(self) -> RunSpec:
        """What the workers get beside the config."""
        return RunSpec(run_name=self.run_name, data_dir=self.data.data_dir, steps_per_epoch=self.data.steps_per_epoch,
                       tracking_uri=self.tracking_uri, mlflow_run_id=self.mlflow_run_id, data_order=self.data_order)

    def params(self) -> dict[str, Any]:
        """The run settings logged as ``run.*`` MLflow params."""
        r = self.resources
        return dict(num_workers=r.num_workers, device="gpu" if r.use_gpu else "cpu", use_gpu=r.use_gpu,
                    gpus_per_worker=r.gpus_per_worker,
                    cpus_per_worker=r.cpus_per_worker, per_worker_batch=self.config.train.batch_size // r.num_workers,
                    data_order=self.data_order, train_samples=self.data.train_samples,
                    val_samples=self.data.val_samples, steps_per_epoch=self.data.steps_per_epoch,
                    max_failures=self.max_failures, placement_strategy=r.placement_strategy,
                    storage_path=self.storage_path)


def resolve_data_options(cfg: Config, manifest: Mapping[str, Any]) -> tuple[Config, dict[str, str]]:
    """``cfg`` with its ``auto`` values worked out from a prepared dataset's manifest, and how.

    Every training verb (``train``, each ``tune`` trial, the quickstart, the cluster jobs)
    builds a :class:`TrainJob`, which calls this once on the driver: the workers, the
    checkpoint's ``config.yaml`` and the run's params all see the number, never ``auto``.

    * ``loss.nt_pos_weight: auto`` — ``sqrt(targeted / no-target)`` of the train split
      (:func:`instalign.losses.balanced_nt_pos_weight`), from the manifest's counts after
      quarantine.

    Returns:
        The resolved config (``cfg`` itself when nothing is ``auto``) and ``{key: how}``.
    """
    derived: dict[str, str] = {}
    if cfg.loss.nt_pos_weight == "auto":
        split = cfg.data.train_split
        counts = manifest.get("counts", {}).get(split)
        if counts is None:
            raise ValueError(f"loss.nt_pos_weight=auto: the dataset has no split {split!r} to balance on "
                             f"(it has {sorted(manifest.get('counts', {}))})")
        total, nt = int(counts["samples"]), int(counts.get("no_target_samples", 0))
        weight = balanced_nt_pos_weight(total, nt)
        cfg = apply_overrides(cfg, [f"loss.nt_pos_weight={weight}"])
        derived["loss.nt_pos_weight"] = (f"auto: {weight} = sqrt(targeted / no-target) = sqrt({total - nt} / {nt}) "
                                         f"of split {split!r}" if 0 < nt < total else
                                         f"auto: 1.0 (split {split!r} has {nt} no-target of {total} samples: "
                                         "nothing to balance)")
        log.info("loss.nt_pos_weight %s", derived["loss.nt_pos_weight"])
    return cfg, derived


def count_samples(manifest: Mapping[str, Any], split: str, cap: int, data_dir: str) -> int:
    """Samples of ``split`` per the manifest (after quarantine), capped at ``cap`` (0: no cap)."""
    counts = manifest.get("counts", {})
    if split not in counts:
        raise ValueError(f"{data_dir}: the dataset has no split {split!r} (it has {sorted(counts)})")
    n = int(counts[split]["samples"])
    return min(n, cap) if cap else n


def plan_data(cfg: Config, data_dir: str, manifest: Mapping[str, Any], num_workers: int) -> DataPlan:
    """Check ``cfg`` against the dataset for ``num_workers`` workers; the samples and steps it gives.

    Raises:
        ValueError: no such split, a global batch that does not split evenly over the workers
            and the accumulated micro-batches (``steps_per_epoch`` counts optimizer steps),
            or fewer train samples than one global batch.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    if batch % (num_workers * accum):
        raise ValueError(f"train.batch_size={batch} does not split evenly over {num_workers} workers × "
                         f"train.grad_accum_steps={accum} micro-batches (the global batch is per-worker "
                         f"micro-batch × workers × grad_accum_steps)")
    d = cfg.data
    n_train = count_samples(manifest, d.train_split, d.max_train_samples, data_dir)
    n_val = count_samples(manifest, d.val_split, d.max_val_samples, data_dir)
    if n_train < batch:
        raise ValueError(f"{data_dir}: split {d.train_split!r} has {n_train} samples, fewer than one global "
                         f"batch (train.batch_size={batch})")
    return DataPlan(data_dir=data_dir, manifest=manifest, train_samples=n_train, val_samples=n_val,
                    steps_per_epoch=n_train // batch)


class GRESDataConfig(DataConfig):
    """How the datasets reach the workers.

    * ``train`` — ``streaming_split(equal=True)`` (every rank the same number of steps, as
      DDP needs), or, in the ``ordered`` mode, not split and read in order by every rank.
    * ``val`` — split with ``equal=False``: Ray's default (``equal=True``) would drop up to
      ``num_workers - 1`` samples, and metrics must cover every sample.
    * ``overlays`` — not split: rank 0 alone reads it.
    """

    def __init__(self, *, data_order: DataOrder = "streaming") -> None:
        options = None
        if data_order == "ordered":
            options = {"train": DataConfig.default_ingest_options()}
            options["train"].preserve_order = True
        super().__init__(datasets_to_split=["train", "val"] if data_order == "streaming" else ["val"],
                         execution_options=options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name == "val":
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                hints = worker_node_ids if self._enable_shard_locality else None
                parts = ds.streaming_split(world_size, equal=False, locality_hints=hints)
            else:
                parts = [p[name] for p in super().configure({name: ds}, world_size, worker_handles, worker_node_ids,
                                                              **kwargs)]
            for rank, part in enumerate(parts):
                output[rank][name] = part
        return output


def build_datasets(cfg: Config, data_dir: str, *, data_order: DataOrder, num_cpus: float) -> dict[str, Any]:
    """The Ray Datasets of a run (``pipelines.data.loader``): train, val and the overlay samples."""
    common = dict(text_cfg=cfg.model.text_encoder, image_size=cfg.model.image_size,
                  max_tokens=cfg.model.text_encoder.max_tokens, num_cpus=num_cpus)
    d = cfg.data
    if data_order == "ordered":
        # One seeded order, fixed for the run, whatever the worker count. ``preserve_order`` must
        # be on when the datasets are created (each captures the context) and while executing.
        ctx = ray.data.DataContext.get_current()
        before, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
        try:
            train = load_samples(data_dir, d.train_split, shuffle=True, seed=cfg.train.seed,
                                 limit=d.max_train_samples, **common).materialize()
        finally:
            ctx.execution_options.preserve_order = before
    else:
        # A fresh random order every epoch (the pipeline re-executes per epoch); a cap then
        # takes a different random subset each epoch.
        train = load_samples(data_dir, d.train_split, shuffle=True, seed=None, limit=d.max_train_samples, **common)
    datasets = {"train": train,
                "val": load_samples(data_dir, d.val_split, shuffle=False, limit=d.max_val_samples, **common)}
    if d.num_overlays:
        datasets["overlays"] = load_samples(data_dir, d.val_split, shuffle=False, limit=d.num_overlays, **common)
    return datasets


def build_trainer(job: TrainJob, datasets: Mapping[str, Any], *, callbacks: Sequence[Any] = ()):
    """The ``TorchTrainer`` of ``job``; the config and run spec travel to the workers as dataclasses."""
    from ray.train.torch import TorchTrainer  # 3.4-4 s: paid when a job runs, not by ``train --help``

    r = job.resources
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config(job.config, job.run_spec()),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=r.per_worker(), placement_strategy=r.placement_strategy),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=job.storage_path,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.config.train.keep_checkpoints,
                                               checkpoint_score_attribute=SCORE_METRIC, checkpoint_score_order="max"),
            # Rank 0's progress lines are print()-ed: Train's print patch would print each twice
            # (to the worker's stdout and again through its logger); they reach the driver either way.
            # An observer named in OBSERVER_ENV (an audit, a fault-injection test) reaches the workers.
            worker_runtime_env={"env_vars": {**forwarded_env([OBSERVER_ENV]), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level=ray_log_level()),  # Ray Train's own lines: WARNING unless asked
        ),
        datasets=dict(datasets),
        dataset_config=GRESDataConfig(data_order=job.data_order),
    )


def run_job(job: TrainJob, tracker: Any, *, extra_params: Optional[Mapping[str, Any]] = None,
            callbacks: Sequence[Any] = (), report_waits: bool = True) -> Any:
    """Log the job's inputs into ``tracker`` (its MLflow run), fit it, and return Ray's ``Result``.

    Args:
        tracker: a ``pipelines.core.tracking.MlflowTracker`` on ``job.mlflow_run_id``.
        extra_params: more ``run.*`` params (a Tune trial's search and trial id).
        callbacks: Ray Train ``UserCallback``-s (a Tune trial's report callback).
        report_waits: log what the run waits for when it cannot be placed
            (``pipelines.core.ray_cluster.ResourceWaitReporter``); a Tune trial's driver does that itself.
    """
    d = job.data
    log_run_inputs(tracker, job.config, d.manifest, d.data_dir, {**job.params(), **dict(extra_params or {})})
    if job.derived:
        tracker.set_tags({f"instalign.derived.{key}": how for key, how in job.derived.items()})
    datasets = build_datasets(job.config, d.data_dir, data_order=job.data_order, num_cpus=job.resources.data_cpus)
    trainer = build_trainer(job, datasets, callbacks=callbacks)
    with ResourceWaitReporter() if report_waits else nullcontext():
        result = trainer.fit()
    tracker.set_tags({"instalign.ray_run_path": result.path})
    return result


def best_checkpoint(result: Any):
    """The kept checkpoint with the highest finite ``val_gIoU`` that verifies (ties: the later), else the latest.

    Verified because a resumed run can keep a damaged checkpoint that its workers passed over
    (``pipelines.training.resume.usable_checkpoint``): Ray still holds it, with its old score.
    """
    scored = [(m.get(SCORE_METRIC), m.get("step", 0), c) for c, m in (result.best_checkpoints or [])]
    scored = [s for s in scored if isinstance(s[0], (int, float)) and math.isfinite(s[0])]
    for _, _, checkpoint in sorted(scored, key=lambda s: (s[0], s[1]), reverse=True):
        try:
            with checkpoint.as_directory() as local:
                checkpoint_files(local)
        except CheckpointError as e:
            log.warning("not taking %s as the best checkpoint: %s", checkpoint.path, e)
            continue
        return checkpoint
    return result.checkpoint
