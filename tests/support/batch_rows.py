"""One input row of batch prediction's decode stage (``pipelines.inference.tables.INPUT_SCHEMA``)."""

from __future__ import annotations


def row(row_id: str, **fields) -> dict:
    return {"row_id": row_id, "image": None, "image_path": None, "text": "the red square", "gt_mask": None,
            "gt_no_target": None, "gt_num_targets": None, **fields}
