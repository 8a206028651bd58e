"""The tables of batch prediction (``pipelines.batch_predict``): what it reads and writes.

DATA — a prepared dataset split (``instalign prepare``) or a ``.csv`` / ``.parquet`` table of
(image, expression) pairs — becomes one :data:`INPUT_SCHEMA` row per pair (:func:`read_pairs`;
prepared image rows are exploded into their sentences, with the target union as ground truth,
eq. 8). The actors (``pipelines.batch_actor``) answer in :data:`ACTOR_SCHEMA`, which the job
splits into :data:`PREDICTION_SCHEMA` and :data:`REJECT_SCHEMA` Parquet tables under OUT.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from pipelines.batch_predict import BatchPredictConfig


class BatchPredictError(ValueError):
    """DATA or OUT cannot be used; the message names it and what is wrong."""


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
ACTOR_SCHEMA = pa.schema(list(PREDICTION_SCHEMA) + [
    ("status", pa.string()),  # "ok" | "rejected"
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("metric_state", pa.string()),  # JSON GRESMetrics state of this one row (ground truth only)
])



# --- reading DATA -----------------------------------------------------------------------------

def is_prepared(data: str) -> bool:
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

    if is_prepared(cfg.data):
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
