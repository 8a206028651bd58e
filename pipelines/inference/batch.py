"""``instalign predict --data DATA --out OUT``: offline inference of a registered model on Ray Data.

Paper §3.6 inference (``instalign.predictor.Predictor``: no-target if p̂_nt > 0.5, eq. 12;
else the merged mask σ(M_merged) > 0.5, eq. 8, at the original image size; the instances
the aggregation kept with the words their alignment rows weigh most, eq. 1) over a whole
table of (image, expression) pairs, with one output row per pair in the very record format
the MLflow pyfunc and the Ray Serve application answer (``pipelines.models.records``).

What DATA can be:

* a **prepared dataset** (``instalign prepare``; ``--split``, default ``val``): Ray Data reads
  the split's Parquet files as the manifest lists them and explodes each image row into its
  sentences. These carry ground truth, so every output row also gets its IoU (ReLA's
  per-sample convention: a no-target sample scores 1 when predicted no-target, else 0) and the
  aggregate ``instalign.metrics.GRESMetrics`` (cIoU, gIoU, N_acc, T_acc, Pr@…) are logged to
  the MLflow run. Masks are compared at the stored image size (the size the predictor
  answers at), not at the model's S×S input as ``instalign evaluate`` does;
* a **table** (``.csv`` or ``.parquet``) with a ``text`` column and an ``image_path`` column
  (a local path — relative paths are taken relative to the table's directory — or a URI
  that ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ``file://``…) or, in Parquet, an
  ``image`` column of encoded bytes. An optional ``id`` column names the rows in the output;
  otherwise the row number does. A CSV is read on the driver (it holds paths, not pixels); a
  Parquet table, which may hold the images, is planned from its footers on the driver and
  streamed a row group at a time by Ray tasks (``batch_tables.plan_parquet``), each row
  keeping its number in the table.

How it runs: the checkpoint (a directory, or ``models:/NAME@ALIAS`` resolved once by
``pipelines.models.registry.resolve_checkpoint``) goes into the object store once; DATA is read as
``pipelines.inference.tables.read_pairs`` says; then three stages stream blocks of
:data:`BLOCK_ROWS` rows into one another. Decode (``pipelines.inference.decode``, Ray tasks on
CPUs) reads and checks every row with the serving boundary's own functions
(``pipelines.models.pyfunc``: ``check_text_size``, ``image_size``, ``decode_image``; files capped
at ``pyfunc.MAX_FILE_BYTES`` like ``instalign predict --image``) and decodes its image. The model
stage (``pipelines.inference.actor.ModelStage``) is an actor pool whose actors (on a GPU each when
the cluster has GPUs) build the ``Predictor`` once, check the texts' token counts and predict
the good rows ``--batch-size`` at a time. Encode (``pipelines.inference.encode``, Ray tasks on
CPUs) writes the masks as RLE records and scores rows with ground truth. A row that fails a
check is marked rejected with a reason at the stage that found it and carried to the end: a
bad row never fails the job and is never dropped
(Ray's ``max_errored_blocks`` would drop whole blocks without a count; PLATFORM-FACTS).

Output, under OUT: ``predictions/`` (Parquet, :data:`PREDICTION_SCHEMA`), ``rejects/``
(Parquet, :data:`REJECT_SCHEMA`: the row, a reason code and the message) and
``summary.json`` (counts, reasons, metrics, rows/s). An MLflow run (experiment
``--experiment``) records the same, tagged with the model's registered name and version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from mlflow.store.artifact.utils.models import get_model_name_and_version

from instalign.checkpoint import checkpoint_files
from instalign.errors import USAGE, InstAlignError
from instalign.metrics import GRESMetrics
from pipelines.core.output_dirs import MARKER_NAME, claim_output, replaceable_output
from pipelines.core.ray_cluster import init_ray
from pipelines.core.redaction import redacted_output, write_json
from pipelines.core.resources import (check_leaves_room_for_data, cluster_cpus, cluster_totals,
                                      default_cpus_per_worker, resolve_gpus_per_worker)
from pipelines.core.tracking import ensure_experiment, metric_key, redact_data, redacted_context_tags
from pipelines.inference.actor import ModelStage
from pipelines.inference.decode import decode_rows
from pipelines.inference.encode import encode_rows
from pipelines.inference.batch_flags import add_data_arguments
from pipelines.inference.tables import PREDICTION_SCHEMA, REJECT_SCHEMA, BatchPredictError, is_prepared, read_pairs
from pipelines.models.source import checkpoint_payload, configure_tracking, is_model_uri, resolve_checkpoint

__all__ = ["BatchPredictConfig", "batch_predict", "add_arguments", "run"]

@dataclass(frozen=True)
class BatchPredictConfig:
    """One batch prediction job.

    Args:
        model: checkpoint directory or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        data: a prepared dataset directory, or a ``.csv`` / ``.parquet`` table.
        out: output directory (must not exist, or be empty).
        split: split of a prepared dataset.
        num_workers: model replicas (Ray actors).
        gpus_per_worker: GPUs per replica (0: CPU inference; default: 1 when the cluster has GPUs).
        cpus_per_worker: CPUs per replica (default: 1 with a GPU, else a share leaving CPUs to reading).
        batch_size: rows per model call (default: :data:`GPU_BATCH` on a GPU, :data:`CPU_BATCH` on a CPU).
        top_words: words reported per instance.
        limit: predict the first ``limit`` rows only (0: all).
        address: Ray cluster to join (default: a private local cluster; ``ray_cluster.init_ray``).
        experiment: MLflow experiment of the run.
    """

    model: str
    data: str
    out: str
    split: str = "val"
    num_workers: int = 1
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None
    batch_size: Optional[int] = None
    top_words: int = 3
    limit: int = 0
    address: Optional[str] = None
    experiment: str = "instalign-batch-predict"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise BatchPredictError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.batch_size is not None and self.batch_size < 1:
            raise BatchPredictError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise BatchPredictError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.limit < 0:
            raise BatchPredictError(f"--limit must be >= 0, got {self.limit}")


# --- the job ----------------------------------------------------------------------------------

#: Rows per model call by default: on a GPU a batch of 32 keeps it busy (issue 28's target
#: setting); on a CPU 8 — larger batches were not faster there (docs/performance.md).
GPU_BATCH, CPU_BATCH = 32, 8
#: Rows per block through the CPU stages: each Ray task and each hand-over between stages
#: costs milliseconds whatever its size, so blocks far larger than a model call (blocks of 8:
#: 625 decode, model, encode and write tasks for 5,000 rows) keep that cost per row small.
BLOCK_ROWS = 128


def cpu_stage_cpus(model_cpus: float) -> float:
    """CPUs per decode or encode task: half a CPU, so both fit beside a 1-CPU model actor on 2
    cores, and never the model actors' share: Ray Data fuses a task stage into the actor
    stage after it when their resources are equal (measured: decoding then ran inside the
    model's process, ``MapBatches(decode_rows)->MapBatches(ModelStage)``)."""
    return 0.5 if model_cpus != 0.5 else 0.25


def _stages(ds, payload, cfg: BatchPredictConfig, *, cpus: float, gpus: float, batch_size: int):
    """Decode (Ray tasks on CPUs) → model (the actor pool, GPUs when given) → encode (Ray tasks
    on CPUs): each stage streams blocks to the next, so on a GPU node the CPUs decode and
    encode while the GPU predicts, and the model's process does nothing else."""
    blocks = ds.repartition(target_num_rows_per_block=max(BLOCK_ROWS, batch_size))
    decoded = blocks.map_batches(decode_rows, batch_format="pyarrow", batch_size=None, num_cpus=cpu_stage_cpus(cpus))
    predicted = decoded.map_batches(
        ModelStage,
        fn_constructor_kwargs=dict(checkpoint=[payload], device="cuda" if gpus > 0 else "cpu",
                                   top_words=cfg.top_words),
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
    return predicted.map_batches(encode_rows, batch_format="pyarrow", batch_size=None, num_cpus=cpu_stage_cpus(cpus))


def _model_tags(model: str) -> dict[str, str]:
    """Tags that link the run to the registered version it used (resolved now: an alias moves)."""
    tags = {"instalign.model_uri": model}
    if is_model_uri(model):
        key = get_model_name_and_version(mlflow.MlflowClient(), model.rstrip("/"))
        if len(key) == 2:
            tags.update({"instalign.model_name": str(key[0]), "instalign.model_version": str(key[1])})
        else:
            tags["instalign.logged_model_id"] = str(key[0])
    return tags


def _owns(rel: str) -> bool:
    """The job's layout under ``--out``: the marker, ``summary.json``, ``predictions/`` and ``rejects/`` Parquet."""
    top, slash, rest = rel.partition("/")
    if not slash:
        return rel in (MARKER_NAME, "summary.json")
    return top in ("predictions", "rejects") and (rest == "" or ("/" not in rest and rest.endswith(".parquet")))


def _prepare_out(out: str, data: str) -> Path:
    """A new or empty ``--out``, marked first; never ``--data`` or above it (``pipelines.core.output_dirs``)."""
    fs, path = pafs.LocalFileSystem(), os.path.abspath(out)
    if replaceable_output(fs, path, owns=_owns, inputs=[data], error=BatchPredictError):
        raise BatchPredictError(f"--out {out}: exists and is not an empty directory (an earlier run's output); "
                                f"choose a new one")
    claim_output(fs, path)
    return Path(out)


def batch_predict(cfg: BatchPredictConfig) -> dict[str, Any]:
    """Run one job; returns the summary also written to ``OUT/summary.json``.

    The model's version is resolved and its checkpoint downloaded before Ray starts; the
    actors' output is materialised once (masks as RLE: small) and split into the two tables.
    """
    checkpoint = resolve_checkpoint(cfg.model)
    checkpoint_files(checkpoint)  # an incomplete checkpoint: one message here, not a crash in every actor
    tags = _model_tags(cfg.model)
    if not is_prepared(cfg.data) and not Path(cfg.data).exists():
        raise BatchPredictError(f"{cfg.data}: no such file or directory")
    out = _prepare_out(cfg.out, cfg.data)

    init_ray(cfg.address, data_only=True)
    gpus = resolve_gpus_per_worker(cfg.gpus_per_worker, cluster_totals()["GPU"])
    use_gpu = gpus > 0
    batch_size = cfg.batch_size or (GPU_BATCH if use_gpu else CPU_BATCH)
    cpus = cfg.cpus_per_worker
    if cpus is None:
        cpus = default_cpus_per_worker(cfg.num_workers, use_gpu=use_gpu)
    if not use_gpu:
        check_leaves_room_for_data(cfg.num_workers, cpus)
        free = cluster_cpus() - cfg.num_workers * cpus
        if free < 1:  # reading, repartitioning and splitting run as 1-CPU tasks beside the actors
            raise BatchPredictError(f"{cfg.num_workers} workers x {cpus} CPUs leave {free:g} of the cluster's "
                                    f"{cluster_cpus():g} CPUs free; the read and write tasks need 1 and the job would "
                                    f"hang: lower --cpus-per-worker or --num-workers")

    t0 = time.perf_counter()
    ds, kind = read_pairs(cfg.data, split=cfg.split, limit=cfg.limit)
    payload = ray.put(checkpoint_payload(checkpoint))
    results = _stages(ds, payload, cfg, cpus=cpus, gpus=gpus, batch_size=batch_size).materialize()

    def select(status: str, schema: pa.Schema):
        def keep(table: pa.Table) -> pa.Table:
            return table.filter(pc.equal(table["status"], status)).select(schema.names)
        return results.map_batches(keep, batch_format="pyarrow", batch_size=None)

    side = results.select_columns(["status", "reason", "metric_state"]).to_arrow_refs()
    status = pa.concat_tables(ray.get(side)) if side else pa.table({})
    seconds = time.perf_counter() - t0
    reasons = Counter(r for r, s in zip(status["reason"].to_pylist(), status["status"].to_pylist())
                      if s == "rejected")
    predicted = int(status.num_rows - sum(reasons.values()))
    for name, status_, schema, count in (("predictions", "ok", PREDICTION_SCHEMA, predicted),
                                         ("rejects", "rejected", REJECT_SCHEMA, sum(reasons.values()))):
        if count:
            select(status_, schema).write_parquet(str(out / name))
        else:  # Ray writes no file for no rows; readers still find the table and its schema
            (out / name).mkdir()
            pq.write_table(schema.empty_table(), out / name / "empty.parquet")

    metrics = GRESMetrics()
    for state in status["metric_state"].to_pylist():
        if state is not None:
            metrics.merge(GRESMetrics.from_state(json.loads(state)))
    summary: dict[str, Any] = {
        "model": cfg.model, "data": cfg.data, "kind": kind, "split": cfg.split if kind == "prepared" else None,
        "rows": int(status.num_rows), "predicted": predicted, "rejected": int(sum(reasons.values())),
        "reasons": dict(sorted(reasons.items())), "seconds": round(seconds, 3),
        "rows_per_s": round(status.num_rows / seconds, 3) if seconds > 0 else None,
        "num_workers": cfg.num_workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
        "metrics": metrics.compute() if metrics.state_dict()["samples"] else {},
        "out": str(out.resolve()),
    }
    write_json(out / "summary.json", summary)  # redacted: --data/--model may be URIs with credentials

    # Like every verb's: a new experiment keeps its artifacts beside a sqlite store, not in ./mlruns of the cwd.
    mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.get_tracking_uri(), cfg.experiment))
    with mlflow.start_run(run_name="batch-predict", tags={**redacted_context_tags(), **redact_data(tags),
                                                          "instalign.task": "batch-predict"}) as run:
        params = {**asdict(cfg), "gpus_per_worker": gpus, "batch_size": batch_size}  # as resolved
        mlflow.log_params(redact_data({k: v for k, v in params.items() if v is not None}))
        mlflow.log_metrics({"rows": summary["rows"], "predicted": predicted, "rejected": summary["rejected"],
                            "seconds": seconds, "rows_per_s": summary["rows_per_s"] or 0.0,
                            **{metric_key(k): v for k, v in summary["metrics"].items() if np.isfinite(v)}})
        mlflow.log_dict(redact_data(summary), "summary.json")
    summary["mlflow_run_id"] = run.info.run_id
    write_json(out / "summary.json", summary)
    return summary


# --- CLI --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Standalone parser (``python -m pipelines.inference.batch``)."""
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS|models:/NAME/VERSION")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--top-words", type=int, default=3, help="words reported per instance")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not args.out:
        raise InstAlignError("--data needs --out DIR (the output directory)", exit_code=USAGE)
    configure_tracking(args.tracking_uri)
    cfg = BatchPredictConfig(model=args.model, data=args.data, out=args.out, split=args.split,
                             num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                             cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                             top_words=args.top_words, limit=args.limit, address=args.address,
                             experiment=args.experiment)
    summary = batch_predict(cfg)
    metrics = "  ".join(f"{k} {v:.2f}" for k, v in summary["metrics"].items() if np.isfinite(v))
    print(f"{summary['rows']} rows: {summary['predicted']} predicted, {summary['rejected']} rejected "
          f"{summary['reasons'] or ''} in {summary['seconds']:.1f} s ({summary['rows_per_s']} rows/s)")
    if metrics:
        print(f"metrics: {metrics}")
    print(f"predictions: {summary['out']}/predictions  rejects: {summary['out']}/rejects  "
          f"MLflow run {summary['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pipelines.inference.batch", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    with redacted_output():  # as every ``instalign`` verb's output (pipelines.cli.main)
        _status = run(_parser.parse_args())
    sys.exit(_status)
