"""``instalign predict --data DATA --out OUT``: offline inference of a registered model on Ray Data.

Paper §3.6 inference (``instalign.predictor.Predictor``: no-target if p̂_nt > 0.5, eq. 12;
else the merged mask σ(M_merged) > 0.5, eq. 8, at the original image size; the instances
the aggregation kept with the words their alignment rows weigh most, eq. 1) over a whole
table of (image, expression) pairs, with one output row per pair in the very record format
the MLflow pyfunc and the Ray Serve application answer (``pipelines.prediction_record``).

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
  otherwise the row number does. The table itself is read on the driver (it holds paths,
  not pixels) so that every row keeps its number.

How it runs: the checkpoint (a directory, or ``models:/NAME@ALIAS`` resolved once by
``pipelines.registry.resolve_checkpoint``) goes into the object store once; ``map_batches``
runs :class:`BatchPredictor`, a callable class — an actor pool whose actors (GPU or CPU) each
build the ``Predictor`` once. An actor checks every row with the serving boundary's own
functions (``pipelines.pyfunc``: ``check_text``, ``image_size``, ``decode_image``; files capped
at ``pyfunc.MAX_FILE_BYTES`` like ``instalign predict --image``), predicts the good rows of the
batch together and marks the others rejected with a reason. A bad row never fails the job
(Ray's ``max_errored_blocks`` would drop whole blocks without a count; PLATFORM-FACTS).

Output, under OUT: ``predictions/`` (Parquet, :data:`PREDICTION_SCHEMA`), ``rejects/``
(Parquet, :data:`REJECT_SCHEMA`: the row, a reason code and the message) and
``summary.json`` (counts, reasons, metrics, rows/s). An MLflow run (experiment
``--experiment``) records the same, tagged with the model's registered name and version.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

__all__ = ["BatchPredictConfig", "BatchPredictor", "batch_predict", "add_arguments", "add_data_arguments", "run",
           "PREDICTION_SCHEMA", "REJECT_SCHEMA"]

# --- schemas ----------------------------------------------------------------------------------

RLE_TYPE = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])
INSTANCE_TYPE = pa.struct([
    ("query", pa.int64()),
    ("score", pa.float64()),
    ("bbox", pa.list_(pa.float64())),  # COCO [x, y, w, h]
    ("mask", RLE_TYPE),
    ("words", pa.list_(pa.string())),
    ("word_weights", pa.list_(pa.float64())),
])

#: What the actors read: one row per (image, expression), whatever DATA was.
INPUT_SCHEMA = pa.schema([
    ("row_id", pa.string()),  # "<image_id>:<ref_id>:<sent_id>" (prepared) or the table's id / row number
    ("image", pa.binary()),  # encoded bytes, or null when image_path names the file
    ("image_path", pa.string()),
    ("text", pa.string()),
    ("gt_mask", pa.string()),  # COCO RLE counts of the target union at the stored size; null: no ground truth
    ("gt_no_target", pa.bool_()),
])

#: One row per predicted pair: the pyfunc record's fields, plus the pair and its IoU.
PREDICTION_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("image_path", pa.string()),
    ("text", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("mask", RLE_TYPE),
    ("no_target", pa.bool_()),
    ("no_target_prob", pa.float64()),
    ("instances", pa.list_(INSTANCE_TYPE)),
    ("gt_no_target", pa.bool_()),
    ("iou", pa.float64()),  # null without ground truth
])

#: One row per pair that could not be predicted.
REJECT_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("image_path", pa.string()),
    ("text", pa.string()),
    ("reason", pa.string()),  # missing_image, unreadable_image, image_too_large, empty_text, text_too_long, ...
    ("detail", pa.string()),
])

#: What the actors emit: both of the above in one table, split by ``status`` on the driver.
_ACTOR_SCHEMA = pa.schema(list(PREDICTION_SCHEMA) + [
    ("status", pa.string()),  # "ok" | "rejected"
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("metric_state", pa.string()),  # JSON GRESMetrics state of this one row (ground truth only)
])


class BatchPredictError(ValueError):
    """DATA or OUT cannot be used; the message names it and what is wrong."""


@dataclass(frozen=True)
class BatchPredictConfig:
    """One batch prediction job.

    Args:
        model: checkpoint directory or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        data: a prepared dataset directory, or a ``.csv`` / ``.parquet`` table.
        out: output directory (must not exist, or be empty).
        split: split of a prepared dataset.
        num_workers: model replicas (Ray actors).
        gpus_per_worker: GPUs per replica (0: CPU inference).
        cpus_per_worker: CPUs per replica (default: 1 with a GPU, else a share leaving CPUs to reading).
        batch_size: rows per model call.
        top_words: words reported per instance.
        limit: predict the first ``limit`` rows only (0: all).
        address: Ray cluster to join (default: a private local cluster; ``ray_utils.init_ray``).
        experiment: MLflow experiment of the run.
    """

    model: str
    data: str
    out: str
    split: str = "val"
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: Optional[float] = None
    batch_size: int = 8
    top_words: int = 3
    limit: int = 0
    address: Optional[str] = None
    experiment: str = "instalign-batch-predict"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise BatchPredictError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.batch_size < 1:
            raise BatchPredictError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.gpus_per_worker < 0:
            raise BatchPredictError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.limit < 0:
            raise BatchPredictError(f"--limit must be >= 0, got {self.limit}")


# --- reading DATA -----------------------------------------------------------------------------

def _is_prepared(data: str) -> bool:
    from instalign.data.records import MANIFEST_NAME

    if "://" in data:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(data)
        return fs.get_file_info(f"{root.rstrip('/')}/{MANIFEST_NAME}").type == pafs.FileType.File
    return os.path.isfile(os.path.join(data, MANIFEST_NAME))


def _explode_prepared(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: prepared image rows → one :data:`INPUT_SCHEMA` row per sentence, the
    target union (eq. 8's ground truth) encoded once per sentence at the stored size."""
    from instalign.data.masks import rle_decode_many, rle_encode

    rows = []
    for image in batch.to_pylist():
        h, w = int(image["height"]), int(image["width"])
        index = {int(inst["ann_id"]): k for k, inst in enumerate(image["instances"])}
        masks = rle_decode_many([inst["rle"] for inst in image["instances"]], h, w) if index else None
        for smp in image["samples"]:
            pick = [index[int(a)] for a in smp["ann_ids"] if int(a) in index]
            union = masks[pick].any(0) if pick else np.zeros((h, w), dtype=bool)
            rows.append({"row_id": f"{image['image_id']}:{smp['ref_id']}:{smp['sent_id']}", "image": image["image"],
                         "image_path": None, "text": smp["text"], "gt_mask": rle_encode(union),
                         "gt_no_target": bool(smp["no_target"])})
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def _read_table(data: str) -> pa.Table:
    """A CSV/Parquet table of pairs as :data:`INPUT_SCHEMA` rows (read here, on the driver)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(data)
    try:
        if path.suffix.lower() == ".csv":
            # Every column as text: an id like 007 or a path like 1e5.png must stay what it is.
            with open(path, newline="", encoding="utf-8") as f:
                names = next(csv.reader(f), [])
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True))
        elif path.suffix.lower() == ".parquet" or path.is_dir():
            table = pq.read_table(path)
        else:
            raise BatchPredictError(f"{data}: expected a prepared dataset directory, a .csv or a .parquet table")
    except FileNotFoundError:
        raise BatchPredictError(f"{data}: no such file or directory") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise BatchPredictError(f"{data}: not a readable table: {e}") from None
    columns = set(table.column_names)
    if "text" not in columns:
        raise BatchPredictError(f"{data}: needs a 'text' column (columns: {sorted(columns)})")
    if not columns & {"image_path", "image"}:
        raise BatchPredictError(f"{data}: needs an 'image_path' column (or 'image' bytes in Parquet); "
                                f"columns: {sorted(columns)}")
    n = table.num_rows
    base = path.parent if path.is_file() else path

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in columns else [None] * n

    ids = column("id")
    paths = [None if p is None else (p if "://" in str(p) or os.path.isabs(str(p)) else str(base / str(p)))
             for p in column("image_path")]
    images = column("image")
    texts = [None if t is None else str(t) for t in column("text")]
    return pa.Table.from_pydict({
        "row_id": [str(i) if i is not None else str(k) for k, i in enumerate(ids)],
        "image": [bytes(b) if isinstance(b, (bytes, bytearray)) else None for b in images],
        "image_path": paths,
        "text": texts,
        "gt_mask": [None] * n,
        "gt_no_target": [None] * n,
    }, schema=INPUT_SCHEMA)


def read_pairs(cfg: BatchPredictConfig):
    """DATA as a ``ray.data.Dataset`` of :data:`INPUT_SCHEMA` rows; also says which kind it was."""
    import ray

    if _is_prepared(cfg.data):
        from instalign.data.parquet import split_files

        fs, paths = split_files(cfg.data, cfg.split)
        if not paths:
            raise BatchPredictError(f"{cfg.data}: split {cfg.split!r} has no Parquet file")
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=["image_id", "width", "height", "image",
                                                                  "instances", "samples"])
        ds = ds.map_batches(_explode_prepared, batch_format="pyarrow", batch_size=None)
        kind = "prepared"
    else:
        ds = ray.data.from_arrow(_read_table(cfg.data))
        kind = "table"
    return (ds.limit(cfg.limit) if cfg.limit else ds), kind


# --- the actor --------------------------------------------------------------------------------

def _read_image_file(what: str, path: str) -> bytes:
    """A local file or a ``pyarrow.fs`` URI, at most ``pyfunc.MAX_FILE_BYTES`` (regular files only)."""
    from pipelines.pyfunc import MAX_FILE_BYTES, PyfuncInputError
    from pipelines.serving import FileTooLarge, read_regular_file

    try:
        if "://" not in path or path.startswith("file://"):
            return read_regular_file(path.removeprefix("file://"), MAX_FILE_BYTES)
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        if info.type != pafs.FileType.File:
            raise OSError("not a regular file")
        if info.size is not None and info.size > MAX_FILE_BYTES:
            raise FileTooLarge(path, info.size, MAX_FILE_BYTES)
        with fs.open_input_stream(inner) as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise FileTooLarge(path, len(data), MAX_FILE_BYTES)
        return data
    except FileNotFoundError:
        raise _Rejected("missing_image", f"{what} does not exist") from None
    except FileTooLarge as e:
        raise _Rejected("image_too_large", f"{what} is {e.size} bytes, above the limit of {e.limit}") from None
    except (OSError, pa.ArrowException, ValueError) as e:
        raise _Rejected("unreadable_image", f"{what} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    except PyfuncInputError as e:  # pragma: no cover - read_regular_file raises none today
        raise _Rejected("unreadable_image", str(e)) from None


class _Rejected(Exception):
    """A row that cannot be predicted: ``reason`` (a short code) and ``detail`` (the message)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class BatchPredictor:
    """Ray Data callable class: :data:`INPUT_SCHEMA` rows in, ``_ACTOR_SCHEMA`` rows out.

    Args:
        checkpoint: ``[ObjectRef]`` of the checkpoint payload (a list, so Ray hands over the
            reference) or a local checkpoint directory.
        device: ``"cuda"`` or ``"cpu"``.
        top_words: words reported per instance.
    """

    def __init__(self, *, checkpoint: Any, device: str, top_words: int = 3) -> None:
        from instalign.predictor import Predictor

        if isinstance(checkpoint, list):
            import ray

            from pipelines.evaluate import _materialise

            self._local = _materialise(ray.get(checkpoint[0]))  # removed with the actor
            directory = self._local.name
        else:
            directory = checkpoint
        self.predictor = Predictor.from_checkpoint(directory, device=device, top_words=top_words)

    def _check(self, row: dict[str, Any]):
        """Row → (decoded image, text); raises :class:`_Rejected` with the first problem found."""
        from pipelines.pyfunc import PyfuncInputError, check_text, decode_image, image_size

        what = f"row {row['row_id']}"
        try:
            text = check_text(row["row_id"], row["text"], tokenizer=self.predictor.tokenizer,
                              max_tokens=self.predictor.transform.max_tokens)
        except PyfuncInputError as e:
            empty = not isinstance(row["text"], str) or not row["text"].strip()
            raise _Rejected("empty_text" if empty else "text_too_long", str(e)) from None
        if row["image"]:
            data, what = row["image"], f"{what}: image bytes"
        elif row["image_path"]:
            what = f"{what}: image_path {row['image_path']!r}"
            data = _read_image_file(what, row["image_path"])
        else:
            raise _Rejected("missing_image", f"{what}: no image bytes and no image_path")
        try:
            image_size(what, data)
        except PyfuncInputError as e:
            raise _Rejected("image_too_large" if "pixels" in str(e) else "unreadable_image", str(e)) from None
        try:
            return decode_image(what, data), text
        except PyfuncInputError as e:
            raise _Rejected("unreadable_image", str(e)) from None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from instalign.data.masks import rle_decode
        from instalign.metrics import GRESMetrics
        from pipelines.prediction_record import prediction_to_record

        rows = batch.to_pylist()
        out: list[Optional[dict[str, Any]]] = [None] * len(rows)
        good, pictures, texts = [], [], []
        for k, row in enumerate(rows):
            base = {"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"]}
            try:
                picture, text = self._check(row)
            except _Rejected as e:
                out[k] = {**base, "status": "rejected", "reason": e.reason, "detail": e.detail}
                continue
            good.append(k)
            pictures.append(picture)
            texts.append(text)
        predictions = self.predictor.predict_batch(pictures, texts, batch_size=max(1, len(pictures)))
        for k, picture, prediction in zip(good, pictures, predictions):
            row = rows[k]
            w, h = picture.size
            record = prediction_to_record(prediction)
            result = {"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"], "width": w,
                      "height": h, **record, "gt_no_target": row["gt_no_target"], "iou": None, "status": "ok"}
            if row["gt_mask"] is not None:
                gt = rle_decode(row["gt_mask"], h, w)
                if gt.shape != prediction.mask.shape:
                    raise BatchPredictError(f"row {row['row_id']}: ground truth is {gt.shape}, the image "
                                            f"{prediction.mask.shape}")
                metrics = GRESMetrics()
                metrics.update(prediction.mask[None], np.asarray([prediction.no_target]), gt[None],
                               np.asarray([bool(row["gt_no_target"])]))
                state = metrics.state_dict()
                result["iou"] = float(state["iou_sum"])  # this sample's IoU, ReLA's no-target convention
                result["metric_state"] = json.dumps(state)
            out[k] = result
        return pa.Table.from_pylist(out, schema=_ACTOR_SCHEMA)


# --- the job ----------------------------------------------------------------------------------

def _model_tags(model: str) -> dict[str, str]:
    """Tags that link the run to the registered version it used (resolved now: an alias moves)."""
    from pipelines.registry import is_model_uri

    tags = {"instalign.model_uri": model}
    if is_model_uri(model):
        import mlflow
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        key = get_model_name_and_version(mlflow.MlflowClient(), model.rstrip("/"))
        if len(key) == 2:
            tags.update({"instalign.model_name": str(key[0]), "instalign.model_version": str(key[1])})
        else:
            tags["instalign.logged_model_id"] = str(key[0])
    return tags


def _prepare_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BatchPredictError(f"--out {out}: exists and is not an empty directory; choose a new one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def batch_predict(cfg: BatchPredictConfig) -> dict[str, Any]:
    """Run one job; returns the summary also written to ``OUT/summary.json``.

    The model's version is resolved and its checkpoint downloaded before Ray starts; the
    actors' output is materialised once (masks as RLE: small) and split into the two tables.
    """
    import mlflow
    import pyarrow.compute as pc
    import ray

    from instalign.metrics import GRESMetrics
    from pipelines.evaluate import _checkpoint_payload
    from pipelines.ray_utils import init_ray
    from pipelines.resources import check_leaves_room_for_data, cluster_cpus, default_cpus_per_worker
    from pipelines.registry import resolve_checkpoint
    from pipelines.tracking_mlflow import metric_key, redact_data, redacted_context_tags

    from instalign.checkpoint import checkpoint_files

    checkpoint = resolve_checkpoint(cfg.model)
    checkpoint_files(checkpoint)  # an incomplete checkpoint: one message here, not a crash in every actor
    tags = _model_tags(cfg.model)
    if not _is_prepared(cfg.data) and not Path(cfg.data).exists():
        raise BatchPredictError(f"{cfg.data}: no such file or directory")
    out = _prepare_out(cfg.out)

    init_ray(cfg.address)
    use_gpu = cfg.gpus_per_worker > 0
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
    ds, kind = read_pairs(cfg)
    payload = ray.put(_checkpoint_payload(checkpoint))
    results = ds.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        BatchPredictor,
        fn_constructor_kwargs=dict(checkpoint=[payload], device="cuda" if use_gpu else "cpu",
                                   top_words=cfg.top_words),
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cpus,
        num_gpus=cfg.gpus_per_worker or None,
    ).materialize()

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
            import pyarrow.parquet as pq

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
        "num_workers": cfg.num_workers, "cpus_per_worker": cpus, "gpus_per_worker": cfg.gpus_per_worker,
        "metrics": metrics.compute() if metrics.state_dict()["samples"] else {},
        "out": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name="batch-predict", tags={**redacted_context_tags(), **redact_data(tags),
                                                          "instalign.task": "batch-predict"}) as run:
        mlflow.log_params(redact_data({k: v for k, v in asdict(cfg).items() if v is not None}))
        mlflow.log_metrics({"rows": summary["rows"], "predicted": predicted, "rejected": summary["rejected"],
                            "seconds": seconds, "rows_per_s": summary["rows_per_s"] or 0.0,
                            **{metric_key(k): v for k, v in summary["metrics"].items() if np.isfinite(v)}})
        mlflow.log_dict(redact_data(summary), "summary.json")
    summary["mlflow_run_id"] = run.info.run_id
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- CLI --------------------------------------------------------------------------------------

def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``instalign predict`` adds for ``--data`` (its ``--model``, ``--out``,
    ``--top-words`` and ``--tracking-uri`` are shared)."""
    parser.add_argument("--data", default=None, metavar="DATASET_DIR|TABLE.csv|TABLE.parquet",
                        help="predict every (image, expression) pair of a prepared dataset split or a table "
                             "(columns text + image_path or image); --out is then an output directory")
    parser.add_argument("--split", default="val", help="split of a prepared dataset (default: val)")
    parser.add_argument("--num-workers", type=int, default=1, help="model replicas (Ray actors)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per replica (0: CPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per replica")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model call")
    parser.add_argument("--limit", type=int, default=0, help="predict only the first N rows (0: all)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (auto, HOST:PORT); default: a private local cluster")
    parser.add_argument("--experiment", default="instalign-batch-predict", help="MLflow experiment of the run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Standalone parser (``python -m pipelines.batch_predict``)."""
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS|models:/NAME/VERSION")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--top-words", type=int, default=3, help="words reported per instance")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from instalign.checkpoint import CheckpointError
    from instalign.data.parquet import DatasetFormatError
    from pipelines.registry import RegistryError, configure_tracking

    if not args.out:
        print("instalign predict: --data needs --out DIR (the output directory)", file=sys.stderr)
        return 2
    configure_tracking(args.tracking_uri)
    try:
        cfg = BatchPredictConfig(model=args.model, data=args.data, out=args.out, split=args.split,
                                 num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                                 cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                 top_words=args.top_words, limit=args.limit, address=args.address,
                                 experiment=args.experiment)
        summary = batch_predict(cfg)
    except (BatchPredictError, DatasetFormatError, RegistryError, CheckpointError, FileNotFoundError) as e:
        print(f"instalign predict: {e}", file=sys.stderr)
        return 1
    metrics = "  ".join(f"{k} {v:.2f}" for k, v in summary["metrics"].items() if np.isfinite(v))
    print(f"{summary['rows']} rows: {summary['predicted']} predicted, {summary['rejected']} rejected "
          f"{summary['reasons'] or ''} in {summary['seconds']:.1f} s ({summary['rows_per_s']} rows/s)")
    if metrics:
        print(f"metrics: {metrics}")
    print(f"predictions: {summary['out']}/predictions  rejects: {summary['out']}/rejects  "
          f"MLflow run {summary['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pipelines.batch_predict", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
