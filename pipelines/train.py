"""``instalign train``: the paper's training recipe (§3.7, §4.1; DESIGN §2) on Ray Train V2.

A thin Ray boundary (DESIGN §6.8) around the plain loop of ``instalign.engine``:

* the **driver** (:func:`train`) resolves the config, opens the MLflow run
  (``pipelines.tracking_mlflow``), builds the Ray Datasets (``pipelines.loader``) and a
  ``TorchTrainer`` (:func:`build_trainer`), fits it, then logs the best checkpoint and
  optionally registers it;
* the **workers** (:func:`train_fn_per_worker`) turn ``train_loop_config`` back into the
  ``Config`` dataclass on their first line, build model / criterion / AdamW / linear
  schedule, wrap the model in DDP (gloo on CPU, NCCL on GPU) and call
  ``engine.train_one_epoch`` / ``engine.evaluate``.

Data and batch. Global batch ``train.batch_size`` (32 in the paper) is split evenly:
every worker takes ``batch_size / num_workers`` samples per step; DDP averages gradients,
and the criterion normalises its instance terms by instances averaged over workers, so the
update equals a single-process step on the global batch. Two sharding modes:

* ``streaming`` (default, any dataset size): Ray Data's ``streaming_split(equal=True)``;
  every epoch re-reads the Parquet in a fresh random order (``seed=None``; with
  ``data.max_train_samples`` a fresh random subset). Which worker gets which rows is
  decided at run time: disjoint, not reproducible.
* ``ordered`` (small data, reproducibility): the split is materialised once in a seeded
  order; every worker iterates all of it, permutes windows of 8 global batches by
  ``(seed, epoch)`` and keeps its own slice of each global batch. Global batches are then
  identical for any worker count — a 2-worker run matches a 1-worker run step for step.

Validation every epoch (and when ``train.max_steps`` stops a run): each worker evaluates
its part of the val split (``streaming_split(equal=False)``: nothing dropped), the metric
sums are all-gathered and merged (ReLA semantics, DESIGN §4); rank 0 logs ``val_gIoU`` etc.
and overlays of the first ``data.num_overlays`` val samples.

Checkpoints every ``train.checkpoint_every_steps`` and at each epoch end: rank 0 writes a
directory with ``instalign.checkpoint`` (weights, config, tokenizer, optimizer, scheduler,
step/epoch); every rank calls ``ray.train.report`` (a barrier). Ray keeps the top
``train.keep_checkpoints`` by ``val_gIoU`` plus the latest; mid-epoch checkpoints carry
``val_gIoU = NaN`` (not validated), so they rank last and only live while they are latest.

Resume. Re-running with the same ``--name`` (and storage path) resumes from the latest
checkpoint (Ray V2: constructing the trainer again with the same ``RunConfig`` resumes it;
``TorchTrainer.restore`` is gone) and the MLflow run is found again by name. After a
worker failure (``--max-failures``) Ray restarts the group from the latest *registered*
checkpoint. Both go through the same code: the checkpoint holds the global step, the
epoch and the batches done in it, so the step count and the LR schedule continue exactly.
Mid-epoch, ``ordered`` skips exactly the batches already used; ``streaming`` (random order
anyway) trains the remaining number of batches of the epoch on fresh ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ray.train import DataConfig

from instalign.config import Config, load_config

log = logging.getLogger(__name__)

SCORE_METRIC = "val_gIoU"
FAIL_AT_STEP_ENV = "INSTALIGN_TEST_FAIL_AT_STEP"
FAIL_MARKER_ENV = "INSTALIGN_TEST_FAIL_MARKER"
DATA_ORDERS = ("streaming", "ordered")
#: ``ordered`` mode: global batches shuffled together per epoch.
ORDERED_WINDOW_BATCHES = 8


@dataclass
class RunSpec:
    """What the workers need beyond the ``Config``: the extras of ``train_loop_config``."""

    run_name: str
    data_dir: str
    steps_per_epoch: int
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    data_order: str = "streaming"
    #: Test / audit aid: each rank appends the sample ids of every step to ``<dir>/rank<r>.jsonl``.
    sample_log_dir: Optional[str] = None


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


# --- the worker side -------------------------------------------------------------------------

def loop_config(cfg: Config, spec: RunSpec) -> dict[str, Any]:
    """``train_loop_config``: the config tree as plain data plus a ``run`` entry of extras."""
    return {**cfg.to_dict(), "run": dataclasses.asdict(spec)}


def unpack_loop_config(config: dict[str, Any]) -> tuple[Config, RunSpec]:
    """The inverse of :func:`loop_config` (Tune may have replaced leaves of the tree)."""
    config = dict(config)
    spec = RunSpec(**config.pop("run"))
    return Config.from_dict(config, source="train_loop_config"), spec


def leaves_parameters_unused(cfg: Config) -> bool:
    """Whether some parameters get no gradient under this Table 3 combination (DDP must know).

    Block K's word update (object-to-text attention) is read only by the phrase loss and by
    T_sen; with ``decoder=pot``, no phrase loss (``vanilla``/``none``) and a no-target head fed
    by ``q_global`` alone, nothing reads it.
    """
    return (cfg.model.decoder == "pot" and cfg.model.no_target_input == "q_global"
            and cfg.loss.instance_supervision != "phrase_aligned")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe resume, train, validate, checkpoint, report."""
    cfg, spec = unpack_loop_config(config)

    import ray.train
    import ray.train.torch
    import torch

    from instalign.checkpoint import load_model, load_training_state
    from instalign.engine import resolve_precision
    from instalign.losses import build_criterion
    from instalign.modeling.builders import build_model
    from instalign.modeling.text_encoder import load_tokenizer
    from instalign.optim import build_optimizer, build_scheduler

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = cfg.train
    total_steps = t.epochs * spec.steps_per_epoch
    max_steps = min(t.max_steps or total_steps, total_steps)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "epoch_step": 0}
    checkpoint, skipped = usable_checkpoint(ray.train.get_checkpoint())
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as ckpt_dir:
        if ckpt_dir:
            model, saved = load_model(ckpt_dir)
            tokenizer = load_tokenizer(saved.model.text_encoder)
        else:
            _seed_everything(t.seed)  # the same initial weights on every rank and for any world size
            model = build_model(cfg.model)
            tokenizer = load_tokenizer(cfg.model.text_encoder)
        # DDP (+ device move); a no-op wrapper for 1 worker. Only configs that leave parameters
        # without a gradient pay for DDP's unused-parameter search (see ``leaves_parameters_unused``).
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": leaves_parameters_unused(cfg)})
        if t.compile:
            model = torch.compile(model)  # checkpoint/optimizer code unwraps ``_orig_mod`` and ``module``
        optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, backbone_lr_mult=t.backbone_lr_mult,
                                    text_encoder_lr_mult=t.text_encoder_lr_mult)
        scheduler = build_scheduler(optimizer, total_steps=total_steps, lr=t.lr, min_lr=t.min_lr)
        if ckpt_dir:
            # RNG state is not restored: rank 0 alone saved it, and ranks must differ.
            state.update(load_training_state(ckpt_dir, optimizer, scheduler, restore_rng=False))
    # Per-rank randomness (point sampling), distinct after every resume point too.
    _seed_everything(t.seed + rank + world * int(state["step"]))

    worker = _Worker(cfg=cfg, spec=spec, rank=rank, world=world, device=device, model=model, optimizer=optimizer,
                     scheduler=scheduler, criterion=build_criterion(cfg.loss).to(device), tokenizer=tokenizer,
                     precision=resolve_precision(t.precision, device), max_steps=max_steps)
    if checkpoint is not None:
        worker.record_resume(checkpoint.path, skipped)
    try:
        worker.run(step=int(state["step"]), epoch=int(state["epoch"]), epoch_step=int(state["epoch_step"]))
    finally:
        worker.tracker.close()


def usable_checkpoint(latest: Any) -> tuple[Any, list[tuple[str, str]]]:
    """The newest checkpoint of the run that verifies, and the newer ones skipped with why.

    Ray resumes from the latest registered checkpoint, whatever its state; a damaged one (a
    truncated ``training_state.safetensors``, a partial upload) would fail every restart the
    same way. So every rank lists the run's checkpoint directories (``step_<n>``, siblings of
    the latest), newest first, and takes the first whose seal verifies
    (``instalign.checkpoint.checkpoint_files``). Every rank sees the same storage, so every
    rank picks the same one. None verifying is an error naming each and its problem.
    """
    import posixpath
    import re

    import pyarrow.fs as pafs
    import ray.train

    from instalign.checkpoint import CheckpointError, checkpoint_files

    if latest is None:
        return None, []
    fs, parent = latest.filesystem, posixpath.dirname(latest.path.rstrip("/"))
    latest_name = posixpath.basename(latest.path.rstrip("/"))
    names = sorted((info.base_name for info in fs.get_file_info(pafs.FileSelector(parent))
                    if info.type == pafs.FileType.Directory and re.fullmatch(r"step_\d{8}", info.base_name)
                    and info.base_name <= latest_name), reverse=True)
    if latest_name not in names:  # not one of ours: trust Ray's choice
        names.insert(0, latest_name)
    skipped: list[tuple[str, str]] = []
    for name in names:
        candidate = ray.train.Checkpoint(posixpath.join(parent, name), filesystem=fs)
        try:
            with candidate.as_directory() as local:
                checkpoint_files(local)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", name, e)
            skipped.append((name, str(e)))
            continue
        if skipped:
            log.warning("resuming from %s: the newer checkpoint(s) %s are damaged (see above)", name,
                        ", ".join(n for n, _ in skipped))
        return candidate, skipped
    raise CheckpointError(f"no usable checkpoint in {parent}: " + "; ".join(f"{n}: {why}" for n, why in skipped))


class _Worker:
    """The per-worker loop state; methods are the steps of :func:`train_fn_per_worker`."""

    def __init__(self, *, cfg: Config, spec: RunSpec, rank: int, world: int, device: Any, model: Any,
                 optimizer: Any, scheduler: Any, criterion: Any, tokenizer: Any, precision: str, max_steps: int):
        import ray.train

        from instalign.tracking import NullTracker

        self.cfg, self.spec, self.rank, self.world, self.device = cfg, spec, rank, world, device
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.tokenizer, self.precision, self.max_steps = tokenizer, precision, max_steps
        self.local_batch = cfg.train.batch_size // world
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.overlay_shard = ray.train.get_dataset_shard("overlays") if cfg.data.num_overlays else None
        self.tracker: Any = NullTracker()
        if rank == 0 and spec.mlflow_run_id:
            from pipelines.tracking_mlflow import MlflowTracker

            self.tracker = MlflowTracker(run_id=spec.mlflow_run_id, tracking_uri=spec.tracking_uri)
        self._epoch = 0
        self._fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
        self._fail_marker = os.environ.get(FAIL_MARKER_ENV)
        self._record_placement()

    # --- collectives ----------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _record_placement(self) -> None:
        import ray

        nodes = self._gather(ray.get_runtime_context().get_node_id())
        if self.rank == 0 and hasattr(self.tracker, "set_tags"):
            self.tracker.set_tags({"instalign.worker_nodes": json.dumps(nodes), "instalign.num_workers": self.world})
        self._log_samples({"event": "start", "rank": self.rank, "world": self.world, "node_id": nodes[self.rank]})

    def record_resume(self, path: str, skipped: list[tuple[str, str]]) -> None:
        """Say where this run resumed from (and which damaged checkpoints it passed over)."""
        name = os.path.basename(path.rstrip("/"))
        if self.rank == 0:
            if skipped:
                log.warning("resumed from %s, skipping damaged %s", name, [n for n, _ in skipped])
            if hasattr(self.tracker, "set_tags"):
                self.tracker.set_tags({"instalign.resumed_from": name,
                                       "instalign.skipped_checkpoints": json.dumps(dict(skipped))[:4000]})
        self._log_samples({"event": "resume", "rank": self.rank, "from": name, "skipped": [n for n, _ in skipped]})

    def _log_samples(self, record: dict) -> None:
        if self.spec.sample_log_dir:
            path = Path(self.spec.sample_log_dir) / f"rank{self.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def report_train(self, metrics: dict, step: int) -> None:
        """The engine's ``report``: window means averaged over ranks (throughput summed)."""
        from instalign.tracking import finite_metrics

        gathered = self._gather(finite_metrics(metrics))
        if self.rank != 0:
            return
        keys = set.intersection(*(set(m) for m in gathered))
        merged = {k: sum(m[k] for m in gathered) / (1 if k == "samples_per_s" else len(gathered)) for k in keys}
        merged["epoch"] = self._epoch
        self.tracker.log_metrics(merged, step)

    # --- data ------------------------------------------------------------------------------
    def _train_batches(self, epoch: int, skip: int):
        """This worker's ``Batch``-es of ``epoch`` (module docstring: the two data orders)."""
        from pipelines.loader import RowsToBatch, rows_to_batch

        if self.spec.data_order == "streaming":
            return self.train_shard.iter_torch_batches(batch_size=self.local_batch, drop_last=True,
                                                       collate_fn=RowsToBatch(self.device))
        b, r = self.local_batch, self.rank
        mine = ({k: v[r * b:(r + 1) * b] for k, v in rows.items()} for rows in self._global_batches(epoch))
        return (rows_to_batch(rows, self.device) for rows in itertools.islice(mine, skip, None))

    def _global_batches(self, epoch: int):
        """``ordered``: the split's global batches, permuted within windows by ``(seed, epoch)``.

        Every rank computes the same sequence (same materialised order, same seeds), whatever
        the world size. The permutation is numpy indexing of in-memory rows — Ray's local
        shuffle buffer re-``take``-s Arrow tensor rows and measured several times slower.
        """
        size = self.cfg.train.batch_size
        window = size * ORDERED_WINDOW_BATCHES
        for k, rows in enumerate(self.train_shard.iter_batches(batch_size=window, batch_format="numpy")):
            n = len(rows["sample_id"])
            perm = np.random.default_rng([self.cfg.train.seed, epoch, k]).permutation(n)
            for start in range(0, n - size + 1, size):  # a partial global batch at the end is dropped
                yield {name: col[perm[start:start + size]] for name, col in rows.items()}

    def _audited(self, batches, step: int):
        """Record sample ids (audit) and fire the test fault hook, then pass batches on."""
        for batch in batches:
            if self._fail_at and step == self._fail_at and self.rank == self.world - 1 and self._fail_marker \
                    and not os.path.exists(self._fail_marker):
                Path(self._fail_marker).write_text(f"killed rank {self.rank} before step {step + 1}\n")
                os._exit(1)  # a hard crash: no exception handling, no cleanup — what a lost node looks like
            step += 1
            self._log_samples({"epoch": self._epoch, "step": step, "sample_ids": list(batch.sample_ids)})
            yield batch

    # --- the loop --------------------------------------------------------------------------
    def run(self, *, step: int, epoch: int, epoch_step: int) -> None:
        from instalign.engine import train_one_epoch

        t, spe = self.cfg.train, self.spec.steps_per_epoch
        every = t.checkpoint_every_steps
        while epoch < t.epochs and step < self.max_steps:
            self._epoch = epoch
            epoch_start = step - epoch_step
            stop_at = min(epoch_start + spe, self.max_steps)
            skip = epoch_step if self.spec.data_order == "ordered" else 0
            batches = iter(self._audited(self._train_batches(epoch, skip), step))
            while step < stop_at:
                chunk_end = min(stop_at, (step // every + 1) * every) if every else stop_at
                new = train_one_epoch(self.model, self.criterion, self.optimizer, self.scheduler,
                                      itertools.islice(batches, chunk_end - step), device=self.device,
                                      precision=self.precision, grad_clip=t.grad_clip, report=self.report_train,
                                      step=step, max_steps=self.max_steps, log_every=t.log_every_steps)
                if new == step:
                    log.warning("rank %d: the train shard ran dry at step %d of epoch %d (expected %d steps/epoch)",
                                self.rank, step, epoch, spe)
                    break
                step = new
                if every and step % every == 0 and step < stop_at:
                    self._checkpoint(step=step, epoch=epoch, epoch_step=step - epoch_start, val=None)
            finished_epoch = step >= epoch_start + spe or step < stop_at  # full, or the data ran out
            val = self._validate(step)
            epoch, epoch_step = (epoch + 1, 0) if finished_epoch else (epoch, step - epoch_start)
            self._checkpoint(step=step, epoch=epoch, epoch_step=epoch_step, val=val)

    def _validate(self, step: int) -> dict[str, float]:
        from instalign.checkpoint import unwrap_model
        from instalign.engine import evaluate
        from instalign.metrics import GRESMetrics
        from pipelines.loader import RowsToBatch

        model = unwrap_model(self.model)  # no DDP hooks in eval: shards may differ in length
        batches = self.val_shard.iter_torch_batches(batch_size=self.local_batch, collate_fn=RowsToBatch(self.device))
        local = evaluate(model, batches, device=self.device, precision=self.precision)
        merged = GRESMetrics()
        for s in self._gather(local.state_dict()):
            merged.merge(GRESMetrics.from_state(s))
        val = {f"val_{k}": v for k, v in merged.compute().items()}
        val["val_samples"] = merged.state_dict()["samples"]
        if self.rank == 0:
            self.tracker.log_metrics({**val, "epoch": self._epoch}, step)
            self._log_overlays(model, step)
        return val

    def _log_overlays(self, model: Any, step: int) -> None:
        """The first ``data.num_overlays`` val samples as the predictor and ``visualize`` draw them."""
        if self.overlay_shard is None:
            return
        from PIL import Image

        from instalign.predictor import Predictor
        from instalign.visualize import overlay

        predictor = Predictor(model, self.cfg, self.tokenizer, self.device, precision=self.cfg.train.precision)
        try:
            for rows in self.overlay_shard.iter_batches(batch_size=self.cfg.data.num_overlays, batch_format="numpy"):
                images = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in rows["image"]]
                texts = [self.tokenizer.decode(ids[mask.astype(bool)], skip_special_tokens=True).strip()
                         for ids, mask in zip(rows["input_ids"], rows["attention_mask"])]
                for i, (image, text, pred) in enumerate(zip(images, texts, predictor.predict_batch(images, texts))):
                    name = str(rows["sample_id"][i]).replace(":", "_")
                    self.tracker.log_image(overlay(image, pred, text), f"overlays/step_{step:08d}/{i:02d}_{name}.png")
        finally:
            model.train()  # the predictor put the shared module in eval mode

    def _checkpoint(self, *, step: int, epoch: int, epoch_step: int, val: Optional[dict]) -> None:
        """Rank 0 writes, every rank reports (``ray.train.report`` is a barrier)."""
        import ray.train

        from instalign.checkpoint import save_checkpoint

        metrics = {"step": step, "epoch": epoch, "epoch_step": epoch_step, **(val or {SCORE_METRIC: math.nan})}
        name = f"step_{step:08d}"
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="instalign-ckpt-") as tmp:
            save_checkpoint(tmp, self.model, self.cfg, tokenizer=self.tokenizer, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=step, epoch=epoch, epoch_step=epoch_step,
                            val_metrics={k: v for k, v in (val or {}).items() if math.isfinite(v)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


# --- the driver side -------------------------------------------------------------------------

class GRESDataConfig(DataConfig):
    """How the datasets reach the workers.

    * ``train`` — ``streaming_split(equal=True)`` (every rank the same number of steps, as
      DDP needs), or, in the ``ordered`` mode, not split and read in order by every rank.
    * ``val`` — split with ``equal=False``: Ray's default (``equal=True``) would drop up to
      ``num_workers - 1`` samples, and metrics must cover every sample.
    * ``overlays`` — not split: rank 0 alone reads it.
    """

    def __init__(self, *, data_order: str = "streaming") -> None:
        if data_order not in DATA_ORDERS:
            raise ValueError(f"data_order={data_order!r}: expected one of {DATA_ORDERS}")
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


def count_samples(manifest: dict, split: str, cap: int, data_dir: str) -> int:
    """Samples of ``split`` per the manifest (after quarantine), capped at ``cap`` (0: no cap)."""
    counts = manifest.get("counts", {})
    if split not in counts:
        raise ValueError(f"{data_dir}: the dataset has no split {split!r} (it has {sorted(counts)})")
    n = int(counts[split]["samples"])
    return min(n, cap) if cap else n


def build_datasets(cfg: Config, data_dir: str, *, data_order: str, num_cpus: float) -> dict[str, Any]:
    """The Ray Datasets of a run (``pipelines.loader``): train, val and the overlay samples."""
    import ray.data

    from pipelines.loader import load_samples

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


def build_trainer(cfg: Config, spec: RunSpec, datasets: dict[str, Any], *, num_workers: int, use_gpu: bool,
                  cpus_per_worker: float, gpus_per_worker: float = 1.0, storage_path: str, max_failures: int,
                  placement_strategy: str = "PACK", callbacks: Optional[list] = None):
    """The ``TorchTrainer`` of one run (Tune's driver function builds one per trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_utils import forwarded_env

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config(cfg, spec),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=SCORE_METRIC, checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": forwarded_env()},
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=GRESDataConfig(data_order=spec.data_order),
    )


def best_checkpoint(result: Any):
    """The kept checkpoint with the highest finite ``val_gIoU`` (ties: the later), else the latest."""
    scored = [(m.get(SCORE_METRIC), m.get("step", 0), c) for c, m in (result.best_checkpoints or [])]
    scored = [s for s in scored if isinstance(s[0], (int, float)) and math.isfinite(s[0])]
    return max(scored, key=lambda s: (s[0], s[1]))[2] if scored else result.checkpoint


def _storage_path(storage_path: Optional[str]) -> str:
    if storage_path and "://" in storage_path:
        return storage_path
    return str(Path(storage_path or "ray_results").expanduser().resolve())


def train(cfg: Config, data_dir: str, *, num_workers: int = 1, use_gpu: bool = False, gpus_per_worker: float = 1.0,
          cpus_per_worker: Optional[float] = None, name: Optional[str] = None, storage_path: Optional[str] = None,
          experiment: str = "instalign", register_as: Optional[str] = None, max_failures: int = 2,
          tracking_uri: Optional[str] = None, address: Optional[str] = None, placement_strategy: str = "PACK",
          data_order: str = "streaming", data_cpus_per_task: Optional[float] = None,
          sample_log_dir: Optional[str] = None, callbacks: Optional[list] = None) -> TrainResult:
    """Train InstAlign on Ray Train, tracked in one MLflow run; resume if ``name`` ran before.

    Args:
        cfg: the resolved config.
        data_dir: a prepared dataset (``instalign prepare``); absolute paths or URIs reach workers.
        num_workers: data-parallel workers; ``train.batch_size`` must divide evenly among them.
        use_gpu / gpus_per_worker: one (or a share of a) GPU per worker; NCCL then, gloo on CPU.
        cpus_per_worker: default leaves a quarter of the cluster (at least one CPU) to Ray Data.
        name: the run's name: Ray's run directory and the MLflow run's tag. The same name
            again resumes that run (default: a fresh timestamped name).
        storage_path: where Ray keeps run directories and checkpoints (shared storage on a
            multi-node cluster); default ``./ray_results``.
        experiment: the MLflow experiment.
        register_as: register the best checkpoint under this model name (alias ``candidate``).
        max_failures: worker-group restarts after failures (from the latest checkpoint).
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db`` (sqlite).
        address: a Ray cluster to join; default: the connected one or a new local one.
        placement_strategy: ``PACK`` (default) or ``SPREAD`` workers over nodes.
        data_order: ``streaming`` or ``ordered`` (module docstring).
        data_cpus_per_task: CPUs per decode task of Ray Data (default: what a worker leaves of a CPU).
        sample_log_dir: audit aid: per-rank JSONL of the sample ids of every step.
        callbacks: Ray Train ``UserCallback``-s, e.g. Tune's ``TuneReportCallback`` when a Tune
            trial runs this function (rank 0's reports then become the trial's results).
    """
    from instalign.data.parquet import read_manifest
    from pipelines.ray_utils import (ResourceWaitReporter, check_leaves_room_for_data, default_cpus_per_worker,
                                     init_ray)
    from pipelines.tracking_mlflow import (MlflowTracker, log_checkpoint, log_run_inputs, resolve_tracking_uri,
                                           start_or_resume_run)

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if cfg.train.batch_size % num_workers:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} does not split evenly over {num_workers} workers")
    if data_order not in DATA_ORDERS:
        raise ValueError(f"data_order={data_order!r}: expected one of {DATA_ORDERS}")
    data_dir = data_dir if "://" in str(data_dir) else str(Path(data_dir).resolve())
    manifest = read_manifest(data_dir)
    n_train = count_samples(manifest, cfg.data.train_split, cfg.data.max_train_samples, data_dir)
    n_val = count_samples(manifest, cfg.data.val_split, cfg.data.max_val_samples, data_dir)
    steps_per_epoch = n_train // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{data_dir}: split {cfg.data.train_split!r} has {n_train} samples, fewer than one global "
                         f"batch (train.batch_size={cfg.train.batch_size})")

    init_ray(address)
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(num_workers, use_gpu=use_gpu)
    check_leaves_room_for_data(num_workers, cpus_per_worker)
    fraction = cpus_per_worker - math.floor(cpus_per_worker)
    data_cpus = data_cpus_per_task or (round(1.0 - fraction, 3) if fraction else 1.0)

    name = name or f"instalign-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = _storage_path(storage_path)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    run_id, resumed = start_or_resume_run(tracking_uri=tracking_uri, experiment=experiment, run_name=name)
    tracker = MlflowTracker(run_id=run_id, tracking_uri=tracking_uri, owns_run=True)
    try:
        log_run_inputs(tracker, cfg, manifest, data_dir, dict(
            num_workers=num_workers, use_gpu=use_gpu, gpus_per_worker=gpus_per_worker if use_gpu else 0,
            cpus_per_worker=cpus_per_worker, per_worker_batch=cfg.train.batch_size // num_workers,
            data_order=data_order, train_samples=n_train, val_samples=n_val, steps_per_epoch=steps_per_epoch,
            max_failures=max_failures, placement_strategy=placement_strategy, storage_path=storage))
        spec = RunSpec(run_name=name, data_dir=data_dir, steps_per_epoch=steps_per_epoch, tracking_uri=tracking_uri,
                       mlflow_run_id=run_id, data_order=data_order, sample_log_dir=sample_log_dir)
        datasets = build_datasets(cfg, data_dir, data_order=data_order, num_cpus=data_cpus)
        trainer = build_trainer(cfg, spec, datasets, num_workers=num_workers, use_gpu=use_gpu,
                                cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                storage_path=storage, max_failures=max_failures, placement_strategy=placement_strategy,
                                callbacks=callbacks)
        with ResourceWaitReporter():  # a run that cannot be placed says what it waits for
            result = trainer.fit()
        best, last = best_checkpoint(result), result.checkpoint
        tags = {"instalign.ray_run_path": result.path}
        if best is not None:
            tags["instalign.best_checkpoint"] = best.path
            with best.as_directory() as ckpt_dir:
                log_checkpoint(tracker, ckpt_dir, "checkpoints/best")
        tracker.set_tags(tags)
        registered = None
        if register_as and best is not None:
            import mlflow

            from pipelines.pyfunc import log_and_register

            mlflow.set_tracking_uri(tracking_uri)
            with best.as_directory() as ckpt_dir:
                version = log_and_register(ckpt_dir, registered_model_name=register_as, alias="candidate",
                                           run_id=run_id)
            registered = str(version.version)
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return TrainResult(run_name=name, mlflow_run_id=run_id, tracking_uri=tracking_uri, path=result.path,
                       best_checkpoint=best.path if best else None, last_checkpoint=last.path if last else None,
                       metrics=dict(result.metrics or {}), resumed=resumed, registered_version=registered)


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="paper", help="a preset (paper, tiny) or a YAML file")
    parser.add_argument("--data", required=True, help="a prepared dataset directory or URI (instalign prepare)")
    parser.add_argument("--num-workers", type=int, default=1, help="data-parallel workers")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: train on CPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs per worker (default: leave a quarter of the cluster to Ray Data)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001)")
    parser.add_argument("--name", default=None, help="run name; the same name again resumes that run")
    parser.add_argument("--storage-path", default=None, help="Ray run storage, a directory or URI (./ray_results)")
    parser.add_argument("--experiment", default="instalign", help="MLflow experiment")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                                             "sqlite:///./mlflow.db)")
    parser.add_argument("--register-as", default=None, help="register the best checkpoint under this model name")
    parser.add_argument("--max-failures", type=int, default=2, help="restarts after worker failures (-1: unlimited)")
    parser.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK",
                                                                         "STRICT_SPREAD"])
    parser.add_argument("--data-order", default="streaming", choices=list(DATA_ORDERS),
                        help="streaming: any size, per-epoch reshuffle; ordered: reproducible for any worker count")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_queries=50 train.epochs=1")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.data, num_workers=args.num_workers, use_gpu=args.gpus_per_worker > 0,
                   gpus_per_worker=args.gpus_per_worker or 1.0, cpus_per_worker=args.cpus_per_worker, name=args.name,
                   storage_path=args.storage_path, experiment=args.experiment, register_as=args.register_as,
                   max_failures=args.max_failures, tracking_uri=args.tracking_uri, address=args.address,
                   placement_strategy=args.placement_strategy, data_order=args.data_order)
    summary = {k: v for k, v in result.metrics.items() if k.startswith("val_") or k in ("step", "epoch")}
    print(json.dumps({"run_name": result.run_name, "mlflow_run_id": result.mlflow_run_id, "resumed": result.resumed,
                      "best_checkpoint": result.best_checkpoint, "registered_version": result.registered_version,
                      "metrics": summary}, indent=2, default=str))
    return 0
