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

Observers. ``RunSpec.hook``, when set, is called on every rank with ``(event, info)`` — ``start``
(rank, world, node id), ``resume`` (the checkpoint, the damaged ones skipped) and ``step``
(before each batch is trained: epoch, step, sample ids). Tests install one to audit which
samples each rank trained on and to crash a worker at a chosen step; production runs none.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from instalign.config import Config, DataOrder
from pipelines.training.resume import checkpoint_name, usable_checkpoint

log = logging.getLogger(__name__)

SCORE_METRIC = "val_gIoU"
#: ``ordered`` mode: global batches shuffled together per epoch.
ORDERED_WINDOW_BATCHES = 8

#: ``hook(event, info)``: an observer of a worker's progress (module docstring).
WorkerHook = Callable[[str, dict], None]


@dataclass
class RunSpec:
    """What the workers need beyond the ``Config`` (the ``run`` entry of ``train_loop_config``)."""

    run_name: str
    data_dir: str
    steps_per_epoch: int
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    data_order: DataOrder = "streaming"  # checked where it entered (``pipelines.training.job.check_data_order``)
    hook: Optional[WorkerHook] = None

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


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe resume, train, validate, checkpoint, report."""
    import ray.train
    import ray.train.torch
    import torch

    from instalign.checkpoint import load_model, load_training_state
    from instalign.engine import resolve_precision
    from instalign.losses import build_criterion
    from instalign.modeling.builders import build_model
    from instalign.modeling.text_encoder import load_tokenizer
    from instalign.optim import build_optimizer, build_scheduler

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
    # One system-metrics monitor per node (its local rank 0): CPU, memory, disk, network and
    # NVIDIA GPU use as system/node_<n>/... metrics of the job's run (pipelines.training.system_metrics).
    monitor = nullcontext()
    if ctx.get_local_rank() == 0 and spec.mlflow_run_id:
        from pipelines.training.system_metrics import system_metrics

        monitor = system_metrics(spec.mlflow_run_id, spec.tracking_uri, node_id=f"node_{ctx.get_node_rank()}")
    with monitor:
        try:
            worker.run(step=int(state["step"]), epoch=int(state["epoch"]), epoch_step=int(state["epoch_step"]))
        finally:
            worker.tracker.close()


class _Worker:
    """The per-worker loop state; methods are the steps of :func:`train_fn_per_worker`."""

    def __init__(self, *, cfg: Config, spec: RunSpec, rank: int, world: int, device: Any, model: Any,
                 optimizer: Any, scheduler: Any, criterion: Any, tokenizer: Any, precision: str, max_steps: int):
        import ray.train

        from instalign.tracking import NullTracker, Tracker

        self.cfg, self.spec, self.rank, self.world, self.device = cfg, spec, rank, world, device
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.tokenizer, self.precision, self.max_steps = tokenizer, precision, max_steps
        self.accum = cfg.train.grad_accum_steps
        self.local_batch = cfg.train.batch_size // world // self.accum  # one micro-batch
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.overlay_shard = ray.train.get_dataset_shard("overlays") if cfg.data.num_overlays else None
        self.mlflow = None  # rank 0's MLflow run, for tags beyond the Tracker protocol
        if rank == 0 and spec.mlflow_run_id:
            from pipelines.core.tracking import MlflowTracker

            self.mlflow = MlflowTracker(run_id=spec.mlflow_run_id, tracking_uri=spec.tracking_uri)
        self.tracker: Tracker = self.mlflow or NullTracker()
        self._epoch = 0
        self._damaged: set[str] = set()  # checkpoints passed over on resume (``checkpoint_name``)
        self._resumed_from: Optional[str] = None
        self.progress = None  # rank 0's progress lines (``pipelines.training.progress``)
        if rank == 0:
            from pipelines.training.progress import ProgressPrinter

            self.progress = ProgressPrinter(epochs=cfg.train.epochs, steps_per_epoch=spec.steps_per_epoch,
                                            max_steps=max_steps, every=cfg.train.print_every_steps)
        self._last_report: tuple[int, dict] = (-1, {})  # rank 0: the latest merged window and its step
        self._record_placement()

    def _emit(self, event: str, **info: Any) -> None:
        if self.spec.hook is not None:
            self.spec.hook(event, {"rank": self.rank, "world": self.world, **info})

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
        if self.mlflow is not None:
            self.mlflow.set_tags({"instalign.worker_nodes": json.dumps(nodes), "instalign.num_workers": self.world})
        self._emit("start", node_id=nodes[self.rank])

    def record_resume(self, path: str, skipped: list[tuple[str, str]]) -> None:
        """Say where this run resumed from (and which damaged checkpoints it passed over)."""
        name = os.path.basename(path.rstrip("/"))
        self._damaged = {n for n, _ in skipped}
        self._resumed_from = name
        if self.rank == 0 and skipped:
            log.warning("resumed from %s, skipping damaged %s", name, [n for n, _ in skipped])
        if self.mlflow is not None:
            self.mlflow.set_tags({"instalign.resumed_from": name,
                                  "instalign.skipped_checkpoints": json.dumps(dict(skipped))[:4000]})
        self._emit("resume", checkpoint=name, skipped=[n for n, _ in skipped])

    def report_train(self, metrics: dict, step: int) -> None:
        """The engine's ``report``: window means averaged over ranks (throughput summed)."""
        from instalign.tracking import finite_metrics
        from pipelines.training.progress import peak_memory_bytes

        gathered = self._gather({**finite_metrics(metrics), "peak_mem_bytes": peak_memory_bytes(self.device)})
        if self.rank != 0:
            return
        keys = set.intersection(*(set(m) for m in gathered))
        merged = {k: sum(m[k] for m in gathered) / (1 if k == "samples_per_s" else len(gathered)) for k in keys}
        merged["peak_mem_bytes"] = max(m["peak_mem_bytes"] for m in gathered)  # the largest rank's
        merged["epoch"] = self._epoch
        self.tracker.log_metrics(merged, step)
        self._last_report = (step, merged)
        self.progress.train(merged, step, epoch=self._epoch)

    # --- data ------------------------------------------------------------------------------
    def _train_batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """This worker's ``Batch``-es of ``epoch`` (module docstring: the two data orders)."""
        from pipelines.data.loader import RowsToBatch, rows_to_batch

        if self.spec.data_order == "streaming":
            return iter(self.train_shard.iter_torch_batches(batch_size=self.local_batch, drop_last=True,
                                                            collate_fn=RowsToBatch(self.device)))
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
        for k, rows in enumerate(self.train_shard.iter_batches(batch_size=window, batch_format="numpy")):
            n = len(rows["sample_id"])
            perm = np.random.default_rng([self.cfg.train.seed, epoch, k]).permutation(n)
            for start in range(0, n - size + 1, size):  # a partial global batch at the end is dropped
                yield {name: col[perm[start:start + size]] for name, col in rows.items()}

    def _observed(self, batches: Iterator[Any], step: int) -> Iterator[Any]:
        """Pass batches on, telling the hook (if any) which step each is for."""
        if self.spec.hook is None:
            yield from batches
            return
        for i, batch in enumerate(batches):  # micro-batches: ``accum`` per optimizer step
            self._emit("step", epoch=self._epoch, step=step + 1 + i // self.accum, sample_ids=list(batch.sample_ids))
            yield batch

    # --- the loop --------------------------------------------------------------------------
    def run(self, *, step: int, epoch: int, epoch_step: int) -> None:
        from instalign.engine import train_one_epoch

        t, spe = self.cfg.train, self.spec.steps_per_epoch
        every = t.checkpoint_every_steps
        if self.progress is not None:
            self.progress.start(step=step, world=self.world, global_batch=t.batch_size, device=str(self.device),
                                precision=self.precision, resumed_from=self._resumed_from)
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
                    self._checkpoint(step=step, epoch=epoch, epoch_step=step - epoch_start, val=None)
            finished_epoch = step >= epoch_start + spe or step < stop_at  # full, or the data ran out
            last_step, last = self._last_report
            if self.progress is not None and last_step == step and self.progress.every:
                self.progress.train(last, step, epoch=epoch, force=True)  # the epoch's last window, once
            val = self._validate(step)
            epoch, epoch_step = (epoch + 1, 0) if finished_epoch else (epoch, step - epoch_start)
            self._checkpoint(step=step, epoch=epoch, epoch_step=epoch_step, val=val)
        if self.progress is not None:
            self.progress.finish(step)

    def _validate(self, step: int) -> dict[str, float]:
        from instalign.checkpoint import unwrap_model
        from instalign.engine import evaluate
        from instalign.metrics import GRESMetrics, NoTargetScores
        from pipelines.data.loader import RowsToBatch

        model = unwrap_model(self.model)  # no DDP hooks in eval: shards may differ in length
        batches = self.val_shard.iter_torch_batches(batch_size=self.local_batch, collate_fn=RowsToBatch(self.device))
        scores = NoTargetScores()  # the no-target head's AUROC and score quartiles per class
        local = evaluate(model, batches, device=self.device, precision=self.precision, scores=scores)
        merged, merged_scores = GRESMetrics(), NoTargetScores()
        for s, h in self._gather((local.state_dict(), scores.state_dict())):
            merged.merge(GRESMetrics.from_state(s))
            merged_scores.merge(NoTargetScores.from_state(h))
        val = {f"val_{k}": v for k, v in {**merged.compute(), **merged_scores.compute()}.items()}
        val["val_samples"] = merged.state_dict()["samples"]
        if self.rank == 0:
            self.tracker.log_metrics({**val, "epoch": self._epoch}, step)
            self.progress.validation(val, step, epoch=self._epoch)
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
        name = checkpoint_name(step, self._damaged)
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="instalign-ckpt-") as tmp:
            save_checkpoint(tmp, self.model, self.cfg, tokenizer=self.tokenizer, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=step, epoch=epoch, epoch_step=epoch_step,
                            val_metrics={k: v for k, v in (val or {}).items() if math.isfinite(v)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
