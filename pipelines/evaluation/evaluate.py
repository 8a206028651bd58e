"""``instalign evaluate``: a checkpoint or registered model on a prepared split, on Ray Data.

Metrics follow ReLA's gRefCOCO semantics (DESIGN §4; paper §4.1 — cIoU, gIoU, N-acc,
T-acc, Pr@0.7/0.8/0.9) or Ref-ZOM's (mIoU, oIoU, Acc), computed at the evaluation
resolution S (480 for the paper) on the paper's inference rule (``engine.postprocess``:
empty mask when p̂_nt > 0.5, else σ(M_merged) > 0.5).

How it is distributed:

* the driver resolves the model (a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI is
  downloaded once, ``registry.resolve_checkpoint``), reads the checkpoint's files and puts
  them in the Ray object store once, so workers on other nodes need no shared disk;
* ``pipelines.data.loader.load_samples`` explodes image rows into samples on CPU tasks;
* ``map_batches`` runs :class:`BatchEvaluator`, a callable class: one actor per worker (GPU
  or CPU) builds the model once and, for each batch, runs ``instalign.engine.evaluate`` —
  the same code as a single-process evaluation — and returns the batch's metric *sums*
  (``state_dict``) as one row;
* the driver merges those rows (plain sums, so the result does not depend on how samples
  were split among workers or batches) and computes the metrics.

Besides the metrics at the paper's threshold (N_acc / T_acc: p̂_nt > 0.5), every evaluation
reports the no-target head's ``nt_AUROC`` (``instalign.metrics.NoTargetScores``: a 1000-bin
histogram of p̂_nt per class, summed like the rest). ``--threshold-from SPLIT`` (off by
default) also picks the threshold that maximises N_acc + T_acc on SPLIT (normally ``val``)
and reports N_acc / T_acc at it on the evaluated split, *separately* from the paper's
numbers: a tuned threshold is not the paper's inference rule, and chosen on the split it is
evaluated on it is optimistic.

What MLflow keeps (:func:`log_evaluation`; on by default, ``--no-track`` turns it off): every
finished ``instalign evaluate`` is one run in ``--experiment`` (``instalign``, beside the
training runs) of the tracking URI (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``./mlflow.db``), with the command line and source tags, the settings as params, the prepared
dataset as its input (context ``evaluation``, the split as an input tag) and the metrics as
``<split>_<metric>`` (``val_gIoU``). A registered or logged model (``models:/…``) is linked:
the run's model input is its logged model, the metrics are logged with that ``model_id`` (so
they show on the logged model, per dataset), the run is tagged with the model name, version
and id, and the version with the run (``instalign.eval.<split>.run_id``). A failed
evaluation records nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import torch

from instalign.checkpoint import CONFIG_FILE, TEXT_ENCODER_DIR, checkpoint_files, load_model
from instalign.config import load_config
from instalign.data.parquet import read_manifest
from instalign.engine import evaluate, resolve_precision
from instalign.errors import InstAlignError
from instalign.metrics import GRESMetrics, NoTargetScores, RefZOMMetrics
from pipelines.core import flags
from pipelines.core.ray_cluster import init_ray
from pipelines.core.redaction import redact, write_json
from pipelines.core.resources import check_leaves_room_for_data, default_cpus_per_worker
from pipelines.core.tracking import MANIFEST_HASH_TAG, ensure_experiment, metric_key, redact_data, run_context_tags
from pipelines.data.lineage import log_dataset_input, manifest_digest
from pipelines.data.loader import load_samples, rows_to_batch
from pipelines.models.source import (RegistryError, checkpoint_payload, configure_tracking, is_model_uri, materialise,
                                     model_ref, resolve_checkpoint)

# MLflow (1.4 CPU-s) is imported where an evaluation is recorded: Ray workers import this
# module to build BatchEvaluator actors, which record nothing.

METRICS = {"gres": GRESMetrics, "refzom": RefZOMMetrics}
#: Which metrics a dataset is reported with by default (the manifest names the dataset).
DEFAULT_METRICS = {"refzom": "refzom"}


class BatchEvaluator:
    """Ray Data callable class: a batch of samples in, one row of metric sums out.

    Args:
        checkpoint: ``[ObjectRef]`` of the checkpoint payload (wrapped in a list so Ray hands
            the reference, not the bytes, to the constructor) or a local directory.
        metrics: ``"gres"`` or ``"refzom"``.
        device: ``"cuda"`` or ``"cpu"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"bf16"`` or ``"fp32"``.
    """

    def __init__(self, *, checkpoint: Any, metrics: str, device: str, precision: str = "auto") -> None:
        if isinstance(checkpoint, list):
            self._local = materialise(ray.get(checkpoint[0]))
            directory = Path(self._local.name)
        else:
            directory = Path(checkpoint)
        self.device = torch.device(device)
        self.model, _ = load_model(directory, device=self.device)
        self.precision = resolve_precision(precision, self.device)
        self.metrics_cls = METRICS[metrics]
        self.worker = uuid.uuid4().hex[:8]  # which replica summed a row: shows the work was spread

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = rows_to_batch(rows, device=self.device)
        scores = NoTargetScores()
        acc = evaluate(self.model, [batch], device=self.device, precision=self.precision, metrics=self.metrics_cls(),
                       scores=scores)
        row = {k: np.asarray([v]) for k, v in acc.state_dict().items()}
        row.update({k: np.asarray([v], dtype=np.int64) for k, v in scores.state_dict().items()})  # (1, bins)
        row["worker"] = np.asarray([self.worker])
        return row


def checkpoint_config(checkpoint_dir: Path):
    """The checkpoint's config, its text encoder pointed at the tokenizer saved inside it
    (also what ``pipelines.evaluation.promote`` measures the trivial baselines with)."""
    checkpoint_files(checkpoint_dir)  # a clear error naming what is missing
    cfg = load_config(checkpoint_dir / CONFIG_FILE)
    text = dataclasses.replace(cfg.model.text_encoder, name=str((checkpoint_dir / TEXT_ENCODER_DIR).resolve()),
                               pretrained=False)
    return cfg, text


def evaluate_dataset(checkpoint: str, data_dir: str, *, split: str = "val", metrics: str | None = None,
                     num_workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: float | None = None,
                     batch_size: int = 8, max_samples: int = 0, precision: str = "auto",
                     address: str | None = None, threshold_from: str | None = None) -> dict[str, float]:
    """Evaluate ``checkpoint`` on ``split`` of the prepared dataset ``data_dir`` with Ray Data.

    Args:
        checkpoint: a checkpoint directory, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
            (resolved against the current MLflow tracking URI).
        metrics: ``"gres"`` or ``"refzom"``; default from the dataset named in the manifest.
        num_workers: model replicas (Ray actors).
        gpus_per_worker: GPUs per replica (0: CPU inference).
        cpus_per_worker: CPUs per replica; default: 1 with a GPU, else a share that leaves
            CPUs to the decode tasks (``resources.default_cpus_per_worker``).
        max_samples: evaluate the first ``max_samples`` samples (0: all).
        address: Ray cluster to join (default: the current connection, else a local cluster).
        threshold_from: also choose a no-target threshold on this split (max N_acc + T_acc)
            and report ``nt_threshold@<split>``, ``N_acc@<split>_threshold`` and
            ``T_acc@<split>_threshold`` on ``split`` (module docstring). Off by default.

    Returns:
        The metrics (percentages, NaN where undefined; ``nt_AUROC`` the no-target head's
        AUROC) plus ``samples``, ``batches``, ``workers_used`` (replicas that summed at
        least one batch) and ``seconds``.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg, text_cfg = checkpoint_config(ckpt_dir)
    manifest = read_manifest(str(data_dir))
    if metrics is None:
        metrics = DEFAULT_METRICS.get(str(manifest.get("dataset", "")), "gres")
    if metrics not in METRICS:
        raise ValueError(f"metrics={metrics!r}: expected one of {sorted(METRICS)}")

    init_ray(address, data_only=True)
    use_gpu = gpus_per_worker > 0
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(num_workers, use_gpu=use_gpu)
    if not use_gpu:
        check_leaves_room_for_data(num_workers, cpus_per_worker)

    t0 = time.perf_counter()
    payload = ray.put(checkpoint_payload(ckpt_dir))
    ds = load_samples(str(data_dir), split, text_cfg=text_cfg, image_size=cfg.model.image_size,
                      max_tokens=cfg.model.text_encoder.max_tokens, shuffle=False, limit=max_samples)
    # Blocks of one batch each: an actor takes the next block when it is free, so the
    # replicas share the split evenly (a split written as one file would be one block).
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    sums = ds.map_batches(
        BatchEvaluator,
        fn_constructor_kwargs=dict(checkpoint=[payload], metrics=metrics, device="cuda" if use_gpu else "cpu",
                                   precision=precision),
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    ).take_all()

    total, scores = METRICS[metrics](), NoTargetScores()
    hist_keys = set(scores.state_dict())
    for row in sums:
        total.merge(METRICS[metrics].from_state({k: v for k, v in row.items() if k != "worker" and k not in hist_keys}))
        scores.merge(NoTargetScores.from_state({k: row[k] for k in hist_keys}))
    result = total.compute()
    result.update(scores.compute())
    result["samples"] = total.state_dict()["samples"]
    result["batches"] = len(sums)
    result["workers_used"] = len({row["worker"] for row in sums})
    if threshold_from:
        chooser = scores if threshold_from == split else _scores_on(
            ckpt_dir, data_dir, threshold_from, cfg=cfg, text_cfg=text_cfg, metrics=metrics, payload=payload,
            num_workers=num_workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
            batch_size=batch_size, max_samples=max_samples, precision=precision)
        threshold = chooser.best_threshold()
        n_acc, t_acc = scores.accuracies(threshold) if math.isfinite(threshold) else (math.nan, math.nan)
        result.update({f"nt_threshold@{threshold_from}": threshold, f"N_acc@{threshold_from}_threshold": n_acc,
                       f"T_acc@{threshold_from}_threshold": t_acc})
    result["seconds"] = time.perf_counter() - t0
    return result


def _scores_on(ckpt_dir: Path, data_dir: str, split: str, *, cfg: Any, text_cfg: Any, metrics: str, payload: Any,
               num_workers: int, gpus_per_worker: float, cpus_per_worker: float, batch_size: int, max_samples: int,
               precision: str) -> NoTargetScores:
    """The p̂_nt histograms of ``split`` (to choose a threshold on), with the same actors' code."""
    ds = load_samples(str(data_dir), split, text_cfg=text_cfg, image_size=cfg.model.image_size,
                      max_tokens=cfg.model.text_encoder.max_tokens, shuffle=False, limit=max_samples)
    rows = ds.repartition(target_num_rows_per_block=batch_size).map_batches(
        BatchEvaluator,
        fn_constructor_kwargs=dict(checkpoint=[payload], metrics=metrics,
                                   device="cuda" if gpus_per_worker > 0 else "cpu", precision=precision),
        compute=ray.data.ActorPoolStrategy(size=num_workers), batch_size=batch_size, batch_format="numpy",
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
    ).select_columns(list(NoTargetScores().state_dict())).take_all()
    scores = NoTargetScores()
    for row in rows:
        scores.merge(NoTargetScores.from_state(row))
    return scores


def format_table(result: dict[str, float], *, title: str) -> str:
    """The metrics as an aligned two-column text table."""
    rows = [(k, "n/a" if isinstance(v, float) and math.isnan(v) else (f"{v:.2f}" if isinstance(v, float) else str(v)))
            for k, v in result.items()]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"{k:<{width}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)


#: Result keys that describe the run, not the model: logged on the run only, unprefixed.
_RUN_KEYS = ("seconds", "batches", "workers_used")


def log_evaluation(result: Mapping[str, float], *, model: str, data_dir: str, split: str, tracking_uri: str,
                   experiment: str = "instalign", params: Optional[Mapping[str, Any]] = None,
                   started: Optional[float] = None) -> str:
    """Record a finished evaluation as one MLflow run (module docstring); returns its id.

    Args:
        result: what :func:`evaluate_dataset` returned.
        model: the evaluated checkpoint directory or ``models:/`` URI (as the user gave it).
        data_dir: the prepared dataset evaluated (its manifest becomes the run's input).
        split: the evaluated split; metric keys are ``<split>_<metric>``.
        tracking_uri: the resolved tracking URI (``registry.configure_tracking``).
        params: the evaluation's settings, logged as params (redacted).
        started: ``time.time()`` when the evaluation began (the run's start time).
    """
    from mlflow import MlflowClient  # lazy: see the imports
    from mlflow.entities import LoggedModelInput, Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    manifest = read_manifest(str(data_dir))
    ref = model_ref(model) if is_model_uri(model) else None
    subject = (f"{ref.name}-v{ref.version}" if ref and ref.name else ref.model_id if ref
               else Path(str(model).rstrip("/")).name)
    tags = {**run_context_tags(), "instalign.kind": "evaluation", "instalign.model_uri": redact(str(model)),
            "instalign.eval_split": split, "instalign.dataset": str(manifest.get("dataset", "?")),
            MANIFEST_HASH_TAG: manifest_digest(manifest)}
    if ref is not None:
        tags.update({k: v for k, v in {"instalign.model_name": ref.name, "instalign.model_version": ref.version,
                                        "instalign.model_id": ref.model_id,
                                        "instalign.model_training_run_id": ref.run_id}.items() if v})
    run = client.create_run(ensure_experiment(tracking_uri, experiment), run_name=redact(f"evaluate-{subject}-{split}"),
                            tags=tags, start_time=int((started or time.time()) * 1000))
    run_id = run.info.run_id
    try:
        settings = redact_data({k: v for k, v in (params or {}).items() if v is not None})
        client.log_batch(run_id, params=[Param(metric_key(k), str(v)[:6000]) for k, v in settings.items()])
        dataset = log_dataset_input(tracking_uri, run_id, manifest, str(data_dir), context="evaluation", split=split)
        model_id = ref.model_id if ref is not None else None
        if model_id:
            client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
        now, metrics = int(time.time() * 1000), []
        for key, value in result.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # NaN (an undefined metric) is left out, as in training
            if key in _RUN_KEYS:
                metrics.append(Metric(metric_key(f"eval_{key}"), float(value), now, 0))
            else:
                metrics.append(Metric(metric_key(f"{split}_{key}"), float(value), now, 0, model_id=model_id,
                                      dataset_name=dataset.name if model_id else None,
                                      dataset_digest=dataset.digest if model_id else None))
        client.log_batch(run_id, metrics=metrics)
        client.log_dict(run_id, dict(result), "evaluation.json")
        if ref is not None and ref.name:
            client.set_model_version_tag(ref.name, ref.version, metric_key(f"instalign.eval.{split}.run_id"), run_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_model(parser)  # --model (alias --checkpoint)
    parser.add_argument("--data", required=True, metavar="PARQUET_DIR", help="a dataset written by `instalign prepare`")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--metrics", choices=sorted(METRICS), default=None,
                        help="gres (cIoU, gIoU, N/T-acc, Pr@) or refzom (mIoU, oIoU, Acc); default from the dataset")
    parser.add_argument("--num-workers", type=int, default=1, help="model replicas (Ray actors)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per replica (0: CPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per replica (default: derived)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0: all)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU")
    flags.add_address(parser)
    flags.add_tracking(parser, experiment="instalign")
    parser.add_argument("--no-track", action="store_true",
                        help="do not record the evaluation as an MLflow run (recorded by default; a models:/ URI "
                             "still reads the registry at --tracking-uri)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the metrics as JSON here")
    parser.add_argument("--threshold-from", metavar="SPLIT", default=None,
                        help="also report N-acc/T-acc at the no-target threshold that maximises N-acc + T-acc "
                             "on SPLIT (e.g. val); reported separately from the paper's 0.5 (off by default)")


def run(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException  # lazy: see the imports

    tracking_uri = configure_tracking(args.tracking_uri) if is_model_uri(args.model) or not args.no_track else None
    started = time.time()
    result = evaluate_dataset(args.model, args.data, split=args.split, metrics=args.metrics,
                              num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                              cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                              max_samples=args.max_samples, precision=args.precision, address=args.address,
                              threshold_from=args.threshold_from)
    tuned = {k: result.pop(k) for k in list(result) if "@" in k and "threshold" in k}
    print(format_table(result, title=f"{args.model} on {args.data} [{args.split}]"))
    if tuned:
        print()
        print(format_table(tuned, title=f"NOT the paper's rule: no-target threshold chosen on {args.threshold_from}"))
        result.update(tuned)
    if args.json:
        write_json(args.json, result)
    if args.no_track:
        return 0
    settings = {k: getattr(args, k) for k in ("split", "metrics", "num_workers", "gpus_per_worker", "batch_size",
                                              "max_samples", "precision", "threshold_from")}
    try:
        run_id = log_evaluation(result, model=args.model, data_dir=args.data, split=args.split,
                                tracking_uri=tracking_uri, experiment=args.experiment,
                                params={**settings, "data": args.data, "model": args.model}, started=started)
    except (RegistryError, MlflowException) as e:
        raise InstAlignError(f"the metrics above were not recorded in MLflow ({tracking_uri}): {e}") from e
    print(f"\nrecorded as MLflow run {run_id} in experiment {args.experiment!r} ({redact(tracking_uri)})")
    return 0
