"""The Arrow schema of a prepared dataset (``instalign.data.records``): one row per image, versioned,
and kept through a real Parquet file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from instalign.data.records import IMAGE_SCHEMA, QUARANTINE_SCHEMA, SCHEMA_VERSION


def test_an_image_row_survives_parquet_with_its_schema_version(tmp_path):
    row = {"image_id": 7, "dataset": "grefcoco", "split": "val", "orig_width": 640, "orig_height": 480,
           "width": 320, "height": 240, "image": b"\xff\xd8jpeg",
           "instances": [{"ann_id": 1, "category_id": 3, "rle": "abc"}],
           "samples": [{"ref_id": 2, "sent_id": 5, "text": "the cat", "ann_ids": [1], "no_target": False},
                       {"ref_id": 3, "sent_id": 6, "text": "the dog", "ann_ids": [], "no_target": True}]}
    pq.write_table(pa.Table.from_pylist([row], schema=IMAGE_SCHEMA), tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.schema.names == IMAGE_SCHEMA.names and table.cast(IMAGE_SCHEMA).schema.equals(IMAGE_SCHEMA)
    assert int(table.schema.metadata[b"instalign.schema_version"]) == SCHEMA_VERSION
    assert table.to_pylist() == [row]


def test_a_quarantine_row_has_a_reason_code_and_a_message():
    assert {"reason", "detail", "image_id", "ref_id", "ann_id"} <= set(QUARANTINE_SCHEMA.names)
