"""The one-process yardstick of batch prediction (``pipelines.bench.predict_loop``): same rows,
same checks, same record format as ``instalign predict --data``, no Ray."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipelines.bench.predict_loop import run
from pipelines.inference.tables import PREDICTION_SCHEMA, REJECT_SCHEMA
from tests.support.images import noise_png as png
from tests.support.tiny_checkpoint import make_checkpoint


def test_predicts_the_good_rows_and_rejects_the_bad_with_a_reason(tmp_path, one_thread):
    (tmp_path / "a.png").write_bytes(png(40, 30))
    table = tmp_path / "pairs.csv"
    table.write_text("image_path,text\na.png,the red square\ngone.png,the ball\na.png,the thing on the left\n")
    assert run(str(make_checkpoint(tmp_path / "ckpt")), str(table), str(tmp_path / "out"), 2) == (2, 1)
    preds, rejects = pq.read_table(tmp_path / "out" / "predictions.parquet"), pq.read_table(tmp_path / "out" / "rejects.parquet")
    assert preds.schema == PREDICTION_SCHEMA and rejects.schema == REJECT_SCHEMA
    assert preds["row_id"].to_pylist() == ["0", "2"] and rejects["row_id"].to_pylist() == ["1"]
