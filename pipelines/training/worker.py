"""One Ray Train worker: the paper's training recipe (§3.7, §4.1; DESIGN §2) around ``instalign.engine``.

:func:`train_fn_per_worker` is the per-worker function of every training job (``instalign
train``, each Tune trial, the quickstart; ``pipelines.training.job`` builds its ``TorchTrainer``). It
receives ``train_loop_config = {"config": Config, "run": RunSpec}`` — the dataclasses
themselves, pickled by Ray — builds model / criterion / AdamW / linear schedule, wraps the
model in DDP (gloo on CPU, NCCL on GPU) and calls ``engine.train_one_epoch`` / ``engine.evaluate``.

Data and batch. Global batch ``train.batch_size`` (32 in the paper) is split evenly:
every worker takes ``batch_size / num_workers / train.grad_accum_steps`` samples per
micro-batch and accumulates ``grad_accum_steps`` of them per step; DDP averages gradients,
and the criterion normalises its instance terms by instances averaged over workers, so the
update equals a single-process step on the global batch. Two data orders:

* ``streaming`` (default, any dataset size): Ray Data's ``streaming_split(equal=True)``;
  every epoch re-reads the Parquet in a fresh random order (with ``data.max_train_samples``
  a fresh random subset). Which worker gets which rows is decided at run time.
* ``ordered`` (small data, reproducibility): the split is materialised once in a seeded
  order; every worker iterates all of it, permutes windows of 8 global batches by
  ``(seed, epoch)`` and keeps its own slice of each global batch. Global batches are then
  identical for any worker count — a 2-worker run matches a 1-worker run step for step.

Validation every epoch (and when ``train.max_steps`` stops a run): each worker evaluates
its part of the val split, the metric sums are all-gathered and merged (ReLA semantics,
DESIGN §4); rank 0 logs ``val_gIoU`` etc. and overlays of the first ``data.num_overlays``.

Checkpoints every ``train.checkpoint_every_steps`` and at each epoch end: rank 0 writes a
directory with ``instalign.checkpoint``; every rank calls ``ray.train.report`` (a barrier).
Mid-epoch checkpoints carry ``val_gIoU = NaN`` (not validated), so they rank last.

Resume (a re-run of the same name, or Ray restarting the group after a failure) starts
from the newest checkpoint that verifies (``pipelines.training.resume``): it holds the global
step, the epoch and the batches done in it, so the step count and the LR schedule continue
exactly. Mid-epoch, ``ordered`` skips exactly the batches already used; ``streaming``
trains the remaining number of batches of the epoch on fresh ones.

What watches the loop — progress lines, MLflow tracking, overlays, checkpoints — is
``pipelines.training.observers``; the loop tells them what happened (started, resumed, each
batch, each log window, each validation) and takes part in every collective itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from instalign.checkpoint import load_model, load_training_state, unwrap_model
from instalign.config import Config, DataOrder
from instalign.engine import evaluate, resolve_compile, resolve_precision, train_one_epoch
from instalign.metrics import GRESMetrics, NoTargetScores
from instalign.tracking import NullTracker, finite_metrics
from pipelines.core.tracking import MlflowTracker
from pipelines.data.loader import PREFETCH_BATCHES, rows_to_batch, torch_batches
from pipelines.training.observers import (Checkpoints, Observer, Observers, Overlays, Place, ProgressLines, Tracking,
                                          observer_from_env)
from pipelines.training.progress import peak_memory_bytes
from pipelines.training.resume import usable_checkpoint
from pipelines.training.system_metrics import system_metrics

log = logging.getLogger(__name__)

#: ``ordered`` mode: global batches shuffled together per epoch.
ORDERED_WINDOW_BATCHES = 8


@dataclass
class RunSpec:
    """What the workers need beyond the ``Config`` (the ``run`` entry of ``train_loop_config``)."""

    run_name: str
    data_dir: str
    steps_per_epoch: int
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    data_order: DataOrder = "streaming"  # checked where it entered (``pipelines.training.job.check_data_order``)

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")


def loop_config(cfg: Config, spec: RunSpec) -> dict[str, Any]:
    """``train_loop_config``: the dataclasses as they are (Ray pickles them with cloudpickle)."""
    return {"config": cfg, "run": spec}


def leaves_parameters_unused(cfg: Config) -> bool:
    """Whether some parameters get no gradient under this Table 3 combination (DDP must know).

    Block K's word update (object-to-text attention) is read only by the phrase loss and by
    T_sen; with ``decoder=pot``, no phrase loss (``vanilla``/``none``) and a no-target head fed
    by the queries alone (``q_global`` or ``mean_queries``), nothing reads it.
    """
    return (cfg.model.decoder == "pot" and cfg.model.no_target_input in ("q_global", "mean_queries")
            and cfg.loss.instance_supervision != "phrase_aligned")


def eval_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model validation runs: the training model without DDP, compiled when training is.

    Why without DDP: its hooks expect every rank to run the same forwards, and the val shards
    may differ in length. Why compiled again: unwrapping ``torch.compile`` too would validate
    the compiled run's model eagerly. Compiling is lazy, so calling this costs nothing until
    the first validation batch; the weights are the training model's own.
    """
    bare = unwrap_model(model)
    return torch.compile(bare) if hasattr(model, "_orig_mod") else bare  # ``_orig_mod``: torch.compile's wrapper


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe resume, train, validate, checkpoint, report."""
    # In the worker only: ray.train.torch (3.4-4 s) and the model stack (timm, ~5 s) would
    # otherwise be paid by every driver that imports this module, ``instalign train --help`` too.
    import ray.train.torch

    from instalign.losses import build_criterion
    from instalign.modeling.builders import build_model
    from instalign.modeling.text_encoder import load_tokenizer
    from instalign.optim import build_optimizer, build_scheduler, freeze_zero_rate_parts

    cfg, spec = config["config"], config["run"]
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
        if t.activation_checkpointing:
            model.set_activation_checkpointing(True)
        # A pretrained part at lr multiplier 0 is frozen, before DDP fixes the parameters it waits for.
        freeze_zero_rate_parts(model, backbone_lr_mult=t.backbone_lr_mult, text_encoder_lr_mult=t.text_encoder_lr_mult)
        # DDP (+ device move); a no-op wrapper for 1 worker. Only configs that leave parameters
        # without a gradient pay for DDP's unused-parameter search (see ``leaves_parameters_unused``).
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": leaves_parameters_unused(cfg)})
        if resolve_compile(t.compile, device):  # ``auto``: on CUDA, eager on CPU
            model = torch.compile(model)  # checkpoint/optimizer code unwraps ``_orig_mod`` and ``module``
        optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, backbone_lr_mult=t.backbone_lr_mult,
                                    text_encoder_lr_mult=t.text_encoder_lr_mult)
        scheduler = build_scheduler(optimizer, total_steps=total_steps, lr=t.lr, min_lr=t.min_lr)
        if ckpt_dir:
            # RNG state is not restored: rank 0 alone saved it, and ranks must differ.
            state.update(load_training_state(ckpt_dir, optimizer, scheduler, restore_rng=False))
    # Per-rank randomness (point sampling), distinct after every resume point too.
    _seed_everything(t.seed + rank + world * int(state["step"]))

    checkpoints = Checkpoints(cfg=cfg, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler,
                              tokenizer=tokenizer)
    observers = Observers(worker_observers(cfg, spec, rank=rank, max_steps=max_steps, device=device,
                                           tokenizer=tokenizer, checkpoints=checkpoints))
    try:
        worker = _Worker(cfg=cfg, spec=spec, rank=rank, world=world, device=device, model=model, optimizer=optimizer,
                         scheduler=scheduler, criterion=build_criterion(cfg.loss).to(device),
                         precision=resolve_precision(t.precision, device), max_steps=max_steps, observers=observers,
                         checkpoints=checkpoints)
        if checkpoint is not None:
            worker.record_resume(checkpoint.path, skipped)
        # One system-metrics monitor per node (its local rank 0): CPU, memory, disk, network and
        # NVIDIA GPU use as system/node_<n>/... metrics of the job's run (pipelines.training.system_metrics).
        monitor = nullcontext()
        if ctx.get_local_rank() == 0 and spec.mlflow_run_id:
            monitor = system_metrics(spec.mlflow_run_id, spec.tracking_uri, node_id=f"node_{ctx.get_node_rank()}")
        with monitor:
            worker.run(step=int(state["step"]), epoch=int(state["epoch"]), epoch_step=int(state["epoch_step"]))
    finally:
        observers.close()


def worker_observers(cfg: Config, spec: RunSpec, *, rank: int, max_steps: int, device: Any, tokenizer: Any,
                     checkpoints: Checkpoints) -> list[Observer]:
    """This rank's observers: rank 0 tracks, prints and draws; every rank checkpoints; plus the
    one :data:`pipelines.training.observers.OBSERVER_ENV` names, if any."""
    observers: list[Observer] = []
    if rank == 0:
        tracker = MlflowTracker(run_id=spec.mlflow_run_id, tracking_uri=spec.tracking_uri) if spec.mlflow_run_id \
            else None
        if tracker is not None:
            observers.append(Tracking(tracker))
        observers.append(ProgressLines(cfg, steps_per_epoch=spec.steps_per_epoch, max_steps=max_steps))
        if cfg.data.num_overlays:
            observers.append(Overlays(cfg, shard=ray.train.get_dataset_shard("overlays"), tokenizer=tokenizer,
                                      device=device, tracker=tracker or NullTracker()))
    observers.append(checkpoints)
    extra = observer_from_env()
    return observers + ([extra] if extra is not None else [])


class _Worker:
    """The per-worker step loop: data, steps, validation and the collectives; ``observers`` watch it."""

    def __init__(self, *, cfg: Config, spec: RunSpec, rank: int, world: int, device: Any, model: Any,
                 optimizer: Any, scheduler: Any, criterion: Any, precision: str, max_steps: int,
                 observers: Observers, checkpoints: Checkpoints):
        self.cfg, self.spec, self.rank, self.world, self.device = cfg, spec, rank, world, device
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.precision, self.max_steps = precision, max_steps
        self.observers, self.checkpoints = observers, checkpoints
        self.accum = cfg.train.grad_accum_steps
        self.local_batch = cfg.train.batch_size // world // self.accum  # one micro-batch
        self.eval_model = eval_model(model)
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self._epoch = 0
        nodes = self._gather(ray.get_runtime_context().get_node_id())
        observers.started(Place(rank=rank, world=world, node_ids=nodes, device=str(device), precision=precision))

    # --- collectives ----------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def record_resume(self, path: str, skipped: list[tuple[str, str]]) -> None:
        """Say where this run resumed from (and which damaged checkpoints it passed over)."""
        name = os.path.basename(path.rstrip("/"))
        if self.rank == 0 and skipped:
            log.warning("resumed from %s, skipping damaged %s", name, [n for n, _ in skipped])
        self.observers.resumed(name, skipped)

    def report_train(self, metrics: dict, step: int) -> None:
        """The engine's ``report``: window means averaged over ranks (throughput summed)."""
        gathered = self._gather({**finite_metrics(metrics), "peak_mem_bytes": peak_memory_bytes(self.device)})
        if self.rank != 0:
            return
        keys = set.intersection(*(set(m) for m in gathered))
        merged = {k: sum(m[k] for m in gathered) / (1 if k == "samples_per_s" else len(gathered)) for k in keys}
        merged["peak_mem_bytes"] = max(m["peak_mem_bytes"] for m in gathered)  # the largest rank's
        merged["epoch"] = self._epoch
        self.observers.trained(merged, step, self._epoch)

    # --- data ------------------------------------------------------------------------------
    def _train_batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """This worker's ``Batch``-es of ``epoch`` (module docstring: the two data orders)."""
        if self.spec.data_order == "streaming":
            return torch_batches(self.train_shard, batch_size=self.local_batch, device=self.device, drop_last=True)
        b, r, micro = self.local_batch, self.rank, self.local_batch * self.world
        # Each global batch is ``accum`` consecutive micro global batches; this rank's slice of each.
        mine = ({k: v[j * micro + r * b:j * micro + (r + 1) * b] for k, v in rows.items()}
                for rows in self._global_batches(epoch) for j in range(self.accum))
        return (rows_to_batch(rows, self.device) for rows in itertools.islice(mine, skip * self.accum, None))

    def _global_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """``ordered``: the split's global batches, permuted within windows by ``(seed, epoch)``.

        Every rank computes the same sequence (same materialised order, same seeds), whatever
        the world size. The permutation is numpy indexing of in-memory rows — Ray's local
        shuffle buffer re-``take``-s Arrow tensor rows and measured several times slower.
        """
        size = self.cfg.train.batch_size
        window = size * ORDERED_WINDOW_BATCHES
        windows = self.train_shard.iter_batches(batch_size=window, batch_format="numpy",
                                                prefetch_batches=PREFETCH_BATCHES)
        for k, rows in enumerate(windows):
            n = len(rows["sample_id"])
            perm = np.random.default_rng([self.cfg.train.seed, epoch, k]).permutation(n)
            for start in range(0, n - size + 1, size):  # a partial global batch at the end is dropped
                yield {name: col[perm[start:start + size]] for name, col in rows.items()}

    def _observed(self, batches: Iterator[Any], step: int) -> Iterator[Any]:
        """Pass batches on, telling the observers (when one watches batches) which step each is for."""
        if not self.observers.wants_batches:
            yield from batches
            return
        for i, batch in enumerate(batches):  # micro-batches: ``accum`` per optimizer step
            self.observers.batch(self._epoch, step + 1 + i // self.accum, batch.sample_ids)
            yield batch

    # --- the loop --------------------------------------------------------------------------
    def run(self, *, step: int, epoch: int, epoch_step: int) -> None:
        t, spe = self.cfg.train, self.spec.steps_per_epoch
        every = t.checkpoint_every_steps
        self.observers.loop_starts(step)
        while epoch < t.epochs and step < self.max_steps:
            self._epoch = epoch
            epoch_start = step - epoch_step
            stop_at = min(epoch_start + spe, self.max_steps)
            skip = epoch_step if self.spec.data_order == "ordered" else 0
            batches = self._observed(self._train_batches(epoch, skip), step)
            while step < stop_at:
                chunk_end = min(stop_at, (step // every + 1) * every) if every else stop_at
                new = train_one_epoch(self.model, self.criterion, self.optimizer, self.scheduler,
                                      itertools.islice(batches, (chunk_end - step) * self.accum), device=self.device,
                                      precision=self.precision, grad_clip=t.grad_clip, report=self.report_train,
                                      step=step, max_steps=self.max_steps, log_every=t.log_every_steps,
                                      grad_accum_steps=self.accum)
                if new == step:
                    log.warning("rank %d: the train shard ran dry at step %d of epoch %d (expected %d steps/epoch)",
                                self.rank, step, epoch, spe)
                    break
                step = new
                if every and step % every == 0 and step < stop_at:
                    self.checkpoints.save(step=step, epoch=epoch, epoch_step=step - epoch_start, val=None)
            finished_epoch = step >= epoch_start + spe or step < stop_at  # full, or the data ran out
            self.observers.epoch_ends(step, epoch)
            val = self._validate(step)
            epoch, epoch_step = (epoch + 1, 0) if finished_epoch else (epoch, step - epoch_start)
            self.checkpoints.save(step=step, epoch=epoch, epoch_step=epoch_step, val=val)
        self.observers.finished(step)

    def _validate(self, step: int) -> dict[str, float]:
        batches = torch_batches(self.val_shard, batch_size=self.local_batch, device=self.device)
        scores = NoTargetScores()  # the no-target head's AUROC and score quartiles per class
        local = evaluate(self.eval_model, batches, device=self.device, precision=self.precision, scores=scores)
        merged, merged_scores = GRESMetrics(), NoTargetScores()
        for s, h in self._gather((local.state_dict(), scores.state_dict())):
            merged.merge(GRESMetrics.from_state(s))
            merged_scores.merge(NoTargetScores.from_state(h))
        val = {f"val_{k}": v for k, v in {**merged.compute(), **merged_scores.compute()}.items()}
        val["val_samples"] = merged.state_dict()["samples"]
        if self.rank == 0:
            self.observers.validated(val, step, self._epoch, unwrap_model(self.model))
        return val
