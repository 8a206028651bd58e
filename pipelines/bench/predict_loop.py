"""The single-process yardstick of batch prediction: ``instalign predict --data`` without Ray.

``python -m pipelines.bench.predict_loop CHECKPOINT TABLE.csv OUT [--batch-size 8] [--threads 1]``
does the same work per row as the Ray path (``pipelines.inference.batch``) in one process:
read the table, read and check each image with the serving boundary's functions, predict
``--batch-size`` pairs at a time with ``Predictor.predict_batch``, turn each answer into the
pyfunc record (RLE masks), and write ``predictions.parquet`` and ``rejects.parquet``. Its wall
and CPU time, read from outside (``/usr/bin/time -v``), are what the Ray path is held against
in docs/performance.md ("Batch prediction").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from instalign.predictor import Predictor
from pipelines.inference.tables import PREDICTION_SCHEMA, REJECT_SCHEMA, read_csv
from pipelines.models.limits import read_regular_file
from pipelines.models.pyfunc import MAX_FILE_BYTES, PyfuncInputError, check_text, decode_image, image_size
from pipelines.models.records import prediction_to_record


def _checked(predictor: Predictor, row: dict):
    """(picture, text) of a row, or raises ``PyfuncInputError``/``OSError`` (a reject)."""
    text = check_text(row["row_id"], row["text"], tokenizer=predictor.tokenizer,
                      max_tokens=predictor.transform.max_tokens)
    what = f"row {row['row_id']}: image_path {row['image_path']!r}"
    data = read_regular_file(row["image_path"], MAX_FILE_BYTES)
    image_size(what, data)
    return decode_image(what, data), text


def run(checkpoint: str, table: str, out: str, batch_size: int) -> tuple[int, int]:
    """Predict every row of ``table``; returns (predicted, rejected)."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    rows = read_csv(table).to_pylist()
    done, rejected = [], []
    for start in range(0, len(rows), batch_size):
        good, pictures, texts = [], [], []
        for row in rows[start:start + batch_size]:
            try:
                picture, text = _checked(predictor, row)
            except (PyfuncInputError, OSError) as e:
                rejected.append({"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"],
                                 "reason": getattr(e, "reason", "unreadable_image"), "detail": str(e)})
                continue
            good.append(row)
            pictures.append(picture)
            texts.append(text)
        for row, picture, prediction in zip(good, pictures, predictor.predict_batch(pictures, texts,
                                                                                    batch_size=max(1, len(texts)))):
            done.append({"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"],
                         "width": picture.width, "height": picture.height, **prediction_to_record(prediction),
                         "gt_no_target": None, "iou": None})
    Path(out).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(done, schema=PREDICTION_SCHEMA), Path(out) / "predictions.parquet")
    pq.write_table(pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA), Path(out) / "rejects.parquet")
    return len(done), len(rejected)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.predict_loop", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("table", help="a CSV with image_path and text columns")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predicted, rejected = run(args.checkpoint, args.table, args.out, args.batch_size)
    print(f"{predicted} predicted, {rejected} rejected")
