"""What watches a Train worker's step loop (``pipelines.training.worker``): progress, tracking, overlays, checkpoints.

The loop trains, validates and takes part in every collective; it tells an :class:`Observer`
what happened, and the observers do the rest, each one trade:

* :class:`ProgressLines` — rank 0's progress lines (``pipelines.training.progress``);
* :class:`Tracking` — rank 0's MLflow run: tags (worker nodes, resume point), metrics;
* :class:`Overlays` — rank 0's overlay images of the first ``data.num_overlays`` val samples;
* :class:`Checkpoints` — the checkpoint directories (rank 0 writes, every rank reports to Ray).

Events, each a no-op in :class:`Observer`, in the order a run emits them:

* ``started(place)`` — every rank, once the group is placed (:class:`Place`);
* ``resumed(checkpoint, skipped)`` — every rank of a run that resumed from a checkpoint;
* ``loop_starts(step)`` — every rank, before the first step it trains;
* ``batch(epoch, step, sample_ids)`` — every rank, before each micro-batch is trained;
* ``trained(metrics, step, epoch)`` — rank 0, a log window's metrics merged over the ranks;
* ``epoch_ends(step, epoch)`` — every rank, after an epoch's (or a stop's) last step;
* ``validated(val, step, epoch, model)`` — rank 0, the val metrics merged over the ranks;
* ``finished(step)`` — every rank, after the last step; ``close()`` — at the end, even on error.

One more observer may be named in the environment, :data:`OBSERVER_ENV`, for audits and
fault-injection tests (which samples each rank trained on; a worker that dies at a chosen
step): production runs name none, and no production setting carries one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import ray.train
from PIL import Image

from instalign.checkpoint import save_checkpoint
from instalign.config import Config
from instalign.predictor import Predictor
from instalign.tracking import Tracker
from instalign.visualize import overlay
from pipelines.training.progress import ProgressPrinter
from pipelines.training.resume import checkpoint_name

log = logging.getLogger(__name__)

SCORE_METRIC = "val_gIoU"
#: ``WHERE:FACTORY[:ARGUMENT]`` — an observer added in every Train worker: ``FACTORY(ARGUMENT)``
#: (or ``FACTORY()``) from ``WHERE``, a module name or the path of a ``.py`` file (a test's
#: helper that workers cannot import by name). Forwarded to the workers by
#: ``pipelines.training.job.build_trainer``.
OBSERVER_ENV = "INSTALIGN_WORKER_OBSERVER"


@dataclass(frozen=True)
class Place:
    """Where a worker runs: its rank, the group's size, every rank's Ray node id, its device."""

    rank: int
    world: int
    node_ids: Sequence[str]
    device: str
    precision: str


class Observer:
    """A watcher of the step loop (module docstring: the events); every event a no-op here."""

    def started(self, place: Place) -> None:
        pass

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        pass

    def loop_starts(self, step: int) -> None:
        pass

    def batch(self, epoch: int, step: int, sample_ids: Sequence[str]) -> None:
        pass

    def trained(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        pass

    def epoch_ends(self, step: int, epoch: int) -> None:
        pass

    def validated(self, val: dict[str, float], step: int, epoch: int, model: Any) -> None:
        pass

    def finished(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Observers(Observer):
    """Several observers as one: each event to each, in order (``close`` to all, even after an error)."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = list(observers)
        self.wants_batches = any(type(o).batch is not Observer.batch for o in self.observers)

    def started(self, place: Place) -> None:
        for o in self.observers:
            o.started(place)

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        for o in self.observers:
            o.resumed(checkpoint, skipped)

    def loop_starts(self, step: int) -> None:
        for o in self.observers:
            o.loop_starts(step)

    def batch(self, epoch: int, step: int, sample_ids: Sequence[str]) -> None:
        for o in self.observers:
            o.batch(epoch, step, sample_ids)

    def trained(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        for o in self.observers:
            o.trained(metrics, step, epoch)

    def epoch_ends(self, step: int, epoch: int) -> None:
        for o in self.observers:
            o.epoch_ends(step, epoch)

    def validated(self, val: dict[str, float], step: int, epoch: int, model: Any) -> None:
        for o in self.observers:
            o.validated(val, step, epoch, model)

    def finished(self, step: int) -> None:
        for o in self.observers:
            o.finished(step)

    def close(self) -> None:
        errors = []
        for o in self.observers:
            try:
                o.close()
            except Exception as e:  # noqa: BLE001 - every observer gets closed; the first error is raised
                errors.append(e)
        if errors:
            raise errors[0]


class ProgressLines(Observer):
    """Rank 0's progress lines: the start, each log window, each validation, the end."""

    def __init__(self, cfg: Config, *, steps_per_epoch: int, max_steps: int) -> None:
        self.cfg = cfg
        self.printer = ProgressPrinter(epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, max_steps=max_steps,
                                       every=cfg.train.print_every_steps)
        self.place: Optional[Place] = None
        self.resumed_from: Optional[str] = None
        self.last: tuple[int, dict] = (-1, {})  # the latest merged window and its step

    def started(self, place: Place) -> None:
        self.place = place

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        self.resumed_from = checkpoint

    def loop_starts(self, step: int) -> None:
        p = self.place
        self.printer.start(step=step, world=p.world, global_batch=self.cfg.train.batch_size, device=p.device,
                           precision=p.precision, resumed_from=self.resumed_from)

    def trained(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        self.last = (step, metrics)
        self.printer.train(metrics, step, epoch=epoch)

    def epoch_ends(self, step: int, epoch: int) -> None:
        last_step, last = self.last
        if last_step == step and self.printer.every:
            self.printer.train(last, step, epoch=epoch, force=True)  # the epoch's last window, once

    def validated(self, val: dict[str, float], step: int, epoch: int, model: Any) -> None:
        self.printer.validation(val, step, epoch=epoch)

    def finished(self, step: int) -> None:
        self.printer.finish(step)


class Tracking(Observer):
    """Rank 0's MLflow run (a ``pipelines.core.tracking.MlflowTracker``): placement and resume tags, metrics."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def started(self, place: Place) -> None:
        self.tracker.set_tags({"instalign.worker_nodes": json.dumps(list(place.node_ids)),
                               "instalign.num_workers": place.world})

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        self.tracker.set_tags({"instalign.resumed_from": checkpoint,
                               "instalign.skipped_checkpoints": json.dumps(dict(skipped))[:4000]})

    def trained(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        self.tracker.log_metrics(metrics, step)

    def validated(self, val: dict[str, float], step: int, epoch: int, model: Any) -> None:
        self.tracker.log_metrics({**val, "epoch": epoch}, step)

    def close(self) -> None:
        self.tracker.close()


class Overlays(Observer):
    """After each validation, the first ``data.num_overlays`` val samples as the predictor and
    ``instalign.visualize`` draw them, logged as ``overlays/step_<step>/<i>_<sample>.png``."""

    def __init__(self, cfg: Config, *, shard: Any, tokenizer: Any, device: Any, tracker: Tracker) -> None:
        self.cfg, self.shard, self.tokenizer, self.device, self.tracker = cfg, shard, tokenizer, device, tracker

    def validated(self, val: dict[str, float], step: int, epoch: int, model: Any) -> None:
        n = self.cfg.data.num_overlays
        # A few pictures per epoch: compiling them (the Predictor's CUDA default) would cost more than it saves.
        predictor = Predictor(model, self.cfg, self.tokenizer, self.device, precision=self.cfg.train.precision,
                              compile=False)
        try:
            for rows in self.shard.iter_batches(batch_size=n, batch_format="numpy"):
                images = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in rows["image"]]
                texts = [self.tokenizer.decode(ids[mask.astype(bool)], skip_special_tokens=True).strip()
                         for ids, mask in zip(rows["input_ids"], rows["attention_mask"])]
                for i, (image, text, pred) in enumerate(zip(images, texts, predictor.predict_batch(images, texts))):
                    name = str(rows["sample_id"][i]).replace(":", "_")
                    self.tracker.log_image(overlay(image, pred, text), f"overlays/step_{step:08d}/{i:02d}_{name}.png")
        finally:
            model.train()  # the predictor put the shared module in eval mode


class Checkpoints(Observer):
    """The run's checkpoints: rank 0 writes a directory (``instalign.checkpoint``), every rank
    reports to Ray (``ray.train.report`` is a barrier). Named ``step_<n>``; a name that a damaged
    checkpoint passed over on resume still holds is not reused (``resume.checkpoint_name``)."""

    def __init__(self, *, cfg: Config, rank: int, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any) -> None:
        self.cfg, self.rank, self.tokenizer = cfg, rank, tokenizer
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.damaged: set[str] = set()

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        self.damaged = {name for name, _ in skipped}

    def save(self, *, step: int, epoch: int, epoch_step: int, val: Optional[dict]) -> None:
        """Report the checkpoint of ``step``; mid-epoch ones (``val=None``) score NaN and rank last."""
        metrics = {"step": step, "epoch": epoch, "epoch_step": epoch_step, **(val or {SCORE_METRIC: math.nan})}
        name = checkpoint_name(step, self.damaged)
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="instalign-ckpt-") as tmp:
            save_checkpoint(tmp, self.model, self.cfg, tokenizer=self.tokenizer, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=step, epoch=epoch, epoch_step=epoch_step,
                            val_metrics={k: v for k, v in (val or {}).items() if math.isfinite(v)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def observer_from_env(value: Optional[str] = None) -> Optional[Observer]:
    """The observer :data:`OBSERVER_ENV` names (``value`` if given), or None when it names none.

    Raises:
        ValueError: a value that is not ``WHERE:FACTORY[:ARGUMENT]``, or names nothing importable.
    """
    value = os.environ.get(OBSERVER_ENV, "") if value is None else value
    if not value:
        return None
    where, _, rest = value.partition(":")
    factory_name, has_argument, argument = rest.partition(":")
    if not where or not factory_name:
        raise ValueError(f"{OBSERVER_ENV}={value!r}: expected WHERE:FACTORY[:ARGUMENT]")
    factory = getattr(_load(where), factory_name, None)
    if not callable(factory):
        raise ValueError(f"{OBSERVER_ENV}={value!r}: {where} has no callable {factory_name!r}")
    return factory(argument) if has_argument else factory()


def _load(where: str) -> Any:
    """A module by name, or from a ``.py`` file (loaded once per process, under its file's stem)."""
    if not where.endswith(".py"):
        return importlib.import_module(where)
    name = f"instalign_observer_{os.path.splitext(os.path.basename(where))[0]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, where)
        if spec is None or spec.loader is None:
            raise ValueError(f"{OBSERVER_ENV}: cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]
