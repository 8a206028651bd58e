"""The tables of batch prediction (``pipelines.inference.batch``): what it reads and writes.

DATA — a prepared dataset split (``instalign prepare``) or a ``.csv`` / ``.parquet`` table of
(image, expression) pairs — becomes one :data:`INPUT_SCHEMA` row per pair (:func:`read_pairs`;
prepared image rows are exploded into their sentences, with the target union as ground truth,
eq. 8). Three stages answer them: decode (``pipelines.inference.decode``: :data:`DECODED_SCHEMA`),
model (``pipelines.inference.actor``: :data:`PREDICTED_SCHEMA`) and encode
(``pipelines.inference.encode``: :data:`ACTOR_SCHEMA`), which the job splits into
:data:`PREDICTION_SCHEMA` and :data:`REJECT_SCHEMA` Parquet tables under OUT.
A Parquet table is streamed a row group at a time (:func:`plan_parquet`, :func:`read_piece`):
one that carries its images must not have to fit in the driver's memory.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from instalign.data.masks import rle_decode_many, rle_encode
from instalign.data.parquet import split_files
from instalign.data.records import MANIFEST_NAME

from instalign.errors import InstAlignError


class BatchPredictError(InstAlignError, ValueError):
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
    ("gt_num_targets", pa.int64()),  # the referred instances (0: no target); the metrics' slices
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

#: A row's fate so far: ``status`` "ok" | "rejected", and for a reject its reason code and message.
_STATUS = [("status", pa.string()), ("reason", pa.string()), ("detail", pa.string())]

#: What the last stage emits: both of the above in one table, split by ``status`` on the driver.
ACTOR_SCHEMA = pa.schema(list(PREDICTION_SCHEMA) + _STATUS + [
    ("metric_state", pa.string()),  # JSON GRESMetrics state of this one row (ground truth only)
])

#: The pair and its ground truth, as every stage passes them on.
_PAIR = [f for f in INPUT_SCHEMA if f.name != "image"]

#: What the decode stage (``pipelines.inference.decode``) hands the model stage: each row's
#: image read, checked and decoded to RGB pixels (``height × width × 3`` bytes), or the row
#: rejected with its reason. The encoded bytes are dropped there: they are not read again.
DECODED_SCHEMA = pa.schema(_PAIR + [("pixels", pa.binary()), ("width", pa.int64()), ("height", pa.int64())]
                           + _STATUS)

#: What the model stage (``pipelines.inference.actor``) hands the encode stage: the answer
#: with its masks as ``numpy.packbits`` of the ``height × width`` bool arrays (an eighth of
#: the bytes; RLE and the record format happen after, off the model's process).
PREDICTED_SCHEMA = pa.schema(list(DECODED_SCHEMA.remove(DECODED_SCHEMA.get_field_index("pixels"))) + [
    ("mask_bits", pa.binary()),
    ("no_target", pa.bool_()),
    ("no_target_prob", pa.float64()),
    ("inst_query", pa.list_(pa.int64())),
    ("inst_score", pa.list_(pa.float64())),
    ("inst_bits", pa.list_(pa.binary())),
    ("inst_words", pa.list_(pa.list_(pa.string()))),
    ("inst_weights", pa.list_(pa.list_(pa.float64()))),
])



# --- reading DATA -----------------------------------------------------------------------------

def is_prepared(data: str) -> bool:
    if "://" in data:
        fs, root = pafs.FileSystem.from_uri(data)
        return fs.get_file_info(f"{root.rstrip('/')}/{MANIFEST_NAME}").type == pafs.FileType.File
    return os.path.isfile(os.path.join(data, MANIFEST_NAME))


def _explode_prepared(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: prepared image rows → one :data:`INPUT_SCHEMA` row per sentence, the
    target union (eq. 8's ground truth) encoded once per sentence at the stored size."""
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
                         "gt_no_target": bool(smp["no_target"]), "gt_num_targets": len(pick)})
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


#: The columns of a pairs table that batch prediction reads (any others are never read).
TABLE_COLUMNS = ("id", "image_path", "image", "text")
#: Rows per block a Parquet read task emits. The task itself holds about 3x one row group
#: (Arrow's Parquet reader decodes a whole row group at once: 64 MiB in one group peaked at
#: 194 MiB of Arrow memory, in 64 groups of 2 MiB at 8 MiB); the driver holds none of it.
READ_ROWS = 32


def _check_columns(data: str, columns: set[str]) -> None:
    if "text" not in columns:
        raise BatchPredictError(f"{data}: needs a 'text' column (columns: {sorted(columns)})")
    if not columns & {"image_path", "image"}:
        raise BatchPredictError(f"{data}: needs an 'image_path' column (or 'image' bytes in Parquet); "
                                f"columns: {sorted(columns)}")


def _image_bytes(table: pa.Table, n: int) -> pa.ChunkedArray:
    """The ``image`` column as ``binary``: its bytes when it holds bytes, else nulls (a CSV's
    text, numbers…), as the Python round trip did. Kept in Arrow: that round trip copied every
    image twice more (4 MiB of images: +4 MiB of ``bytes``, then a 16 MiB Arrow builder)."""
    kind = table.schema.field("image").type if "image" in table.column_names else pa.null()
    if any(test(kind) for test in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary,
                                   pa.types.is_binary_view)):
        return table.column("image").cast(pa.binary())
    return pa.chunked_array([pa.nulls(n, pa.binary())])


def _input_rows(table: pa.Table, base: Path, first: int) -> pa.Table:
    """Rows ``first``, ``first + 1``, … of a pairs table as :data:`INPUT_SCHEMA` rows: a row
    without an ``id`` is named by its number in the whole table, relative image paths are
    taken relative to ``base`` (the table's directory)."""
    columns, n = set(table.column_names), table.num_rows

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in columns else [None] * n

    ids = column("id")
    paths = [None if p is None else (p if "://" in str(p) or os.path.isabs(str(p)) else str(base / str(p)))
             for p in column("image_path")]
    texts = [None if t is None else str(t) for t in column("text")]
    return pa.Table.from_pydict({
        "row_id": [str(i) if i is not None else str(first + k) for k, i in enumerate(ids)],
        "image": _image_bytes(table, n),
        "image_path": paths,
        "text": texts,
        "gt_mask": [None] * n,
        "gt_no_target": [None] * n,
        "gt_num_targets": [None] * n,
    }, schema=INPUT_SCHEMA)


def _table_base(data: str) -> Path:
    path = Path(data)
    return path.parent if path.is_file() else path


def read_csv(data: str) -> pa.Table:
    """A CSV table of pairs as :data:`INPUT_SCHEMA` rows, read on the driver (it holds paths,
    not pixels)."""
    try:
        # Every column as text: an id like 007 or a path like 1e5.png must stay what it is.
        with open(data, newline="", encoding="utf-8") as f:
            names = next(csv.reader(f), [])
        table = pacsv.read_csv(data, convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=True))
    except FileNotFoundError:
        raise BatchPredictError(f"{data}: no such file or directory") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise BatchPredictError(f"{data}: not a readable table: {e}") from None
    _check_columns(data, set(table.column_names))
    return _input_rows(table, _table_base(data), 0)


def plan_parquet(data: str, limit: int = 0) -> list[dict]:
    """The row groups of a Parquet table (a file, or a directory of files in the order
    ``pyarrow.parquet.read_table`` reads them) to read, up to ``limit`` rows (0: all): one
    ``{"path", "row_group", "first", "rows"}`` per row group, ``first`` being the number of
    its first row in the whole table. Only the files' footers are read, never a row."""
    path = Path(data)
    pieces, first = [], 0
    try:
        if path.is_dir():
            dataset = pq.ParquetDataset(path, partitioning=None)
            files, names = dataset.files, dataset.schema.names
        else:
            files = [str(path)]
            with pq.ParquetFile(path) as f:
                names = f.schema_arrow.names
        _check_columns(data, set(names))
        for file in files:
            with pq.ParquetFile(file) as f:
                groups = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
            for group, rows in enumerate(groups):
                rows = min(rows, limit - first) if limit else rows
                if rows > 0:
                    pieces.append({"path": str(file), "row_group": group, "first": first, "rows": rows})
                first += rows
                if limit and first >= limit:
                    return pieces
    except FileNotFoundError:
        raise BatchPredictError(f"{data}: no such file or directory") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise BatchPredictError(f"{data}: not a readable table: {e}") from None
    return pieces


def read_piece(piece: dict, base: str) -> Iterator[pa.Table]:
    """One planned row group (:func:`plan_parquet`) as :data:`INPUT_SCHEMA` tables of at most
    :data:`READ_ROWS` rows each, reading only :data:`TABLE_COLUMNS`."""
    first, end = piece["first"], piece["first"] + piece["rows"]
    with pq.ParquetFile(piece["path"]) as f:
        columns = [c for c in TABLE_COLUMNS if c in f.schema_arrow.names]
        for batch in f.iter_batches(batch_size=READ_ROWS, row_groups=[piece["row_group"]], columns=columns):
            batch = batch.slice(0, end - first)
            if not batch.num_rows:
                break
            yield _input_rows(pa.Table.from_batches([batch]), Path(base), first)
            first += batch.num_rows


def _read_pieces(pieces: pa.Table, base: str) -> Iterator[pa.Table]:
    """Ray Data UDF: planned row groups in, their pairs out, a slice at a time."""
    for piece in pieces.to_pylist():
        yield from read_piece(piece, base)


def _read_table(data: str, limit: int = 0):
    """A CSV/Parquet table of pairs as a ``ray.data.Dataset`` of :data:`INPUT_SCHEMA` rows.

    A CSV (paths, not pixels) is read on the driver. A Parquet table may carry the images
    themselves: the driver plans its row groups from the footers and Ray tasks stream them
    (:func:`read_piece`), on the driver's node — where the file is — so memory stays bounded
    by a row group, whatever the table's size. Row numbers are the table's, as planned.
    """
    suffix = Path(data).suffix.lower()
    if suffix == ".csv":
        return ray.data.from_arrow(read_csv(data))
    if suffix != ".parquet" and not Path(data).is_dir():
        raise BatchPredictError(f"{data}: expected a prepared dataset directory, a .csv or a .parquet table")
    pieces = plan_parquet(data, limit)
    if not pieces:
        return ray.data.from_arrow(INPUT_SCHEMA.empty_table())
    # Pinned as Ray Data pins its own local:// reads (the ray.io/node-id label).
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    return ray.data.from_items(pieces).map_batches(_read_pieces, batch_size=1, batch_format="pyarrow",
                                                   fn_kwargs={"base": str(_table_base(data))}, label_selector=here)


def read_pairs(data: str, *, split: str = "val", limit: int = 0):
    """``data`` (split ``split`` of a prepared dataset, or a table; the first ``limit`` rows if set) as a ``ray.data.Dataset`` of :data:`INPUT_SCHEMA` rows; also says which kind it was."""
    if is_prepared(data):
        fs, paths = split_files(data, split)
        if not paths:
            raise BatchPredictError(f"{data}: split {split!r} has no Parquet file")
        # select_columns, not read_parquet(columns=) (deprecated): Ray pushes it into the scan.
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["image_id", "width", "height", "image",
                                                                         "instances", "samples"])
        ds = ds.map_batches(_explode_prepared, batch_format="pyarrow", batch_size=None)
        kind = "prepared"
    else:
        ds = _read_table(data, limit)
        kind = "table"
    return (ds.limit(limit) if limit else ds), kind
