"""Batch prediction's decode stage (``pipelines.inference.decode``) on Arrow batches, no Ray
cluster: rows it rejects keep their reason and their place; good rows carry their pixels."""

from __future__ import annotations

import pyarrow as pa

from pipelines.inference.decode import decode_rows
from pipelines.inference.tables import DECODED_SCHEMA, INPUT_SCHEMA
from tests.support.batch_rows import row
from tests.support.images import noise_png as png


def test_the_decode_stage_rejects_with_reasons_and_hands_on_pixels_in_order(tmp_path):
    (tmp_path / "a.png").write_bytes(png(40, 30))
    (tmp_path / "fake.png").write_bytes(b"not an image")
    decoded = decode_rows(pa.Table.from_pylist([
        row("file", image_path=str(tmp_path / "a.png")),
        row("missing", image_path=str(tmp_path / "gone.png")),
        row("empty", image=png(40, 30), text="  "),
        row("garbage", image_path=str(tmp_path / "fake.png")),
        row("bytes", image=png(20, 10)),
    ], schema=INPUT_SCHEMA))
    assert decoded.schema == DECODED_SCHEMA
    rows = decoded.to_pylist()
    assert [(r["row_id"], r["status"], r["reason"]) for r in rows] == [
        ("file", "ok", None), ("missing", "rejected", "missing_image"), ("empty", "rejected", "empty_text"),
        ("garbage", "rejected", "unreadable_image"), ("bytes", "ok", None)]
    assert (rows[0]["width"], rows[0]["height"], len(rows[0]["pixels"])) == (40, 30, 40 * 30 * 3)
    assert rows[1]["pixels"] is None and "does not exist" in rows[1]["detail"]
