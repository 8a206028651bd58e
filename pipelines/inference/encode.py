"""Batch prediction's encode stage (``pipelines.inference.batch``): answers in, output rows out, on CPUs.

:func:`encode_rows` runs as plain Ray Data tasks after the model's actor pool
(``pipelines.inference.actor``): it unpacks each answer's bit-packed masks, writes them as
COCO RLE in the very record format the MLflow pyfunc and Ray Serve answer
(``pipelines.models.records.prediction_to_record``), and scores a row that carries ground
truth (its IoU and its ``GRESMetrics`` state, ReLA's no-target convention). That work —
about a quarter of a tiny model's per-row time on a CPU — is then off the model's process.
Rejected rows pass through with their reason.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from instalign.data.masks import rle_decode
from instalign.metrics import GRESMetrics
from instalign.predictor import InstancePrediction, Prediction
from pipelines.inference.tables import ACTOR_SCHEMA, BatchPredictError
from pipelines.models.records import prediction_to_record


def pack_mask(mask: np.ndarray) -> bytes:
    """A ``(h, w)`` bool mask as ``numpy.packbits`` bytes (row-major; the shape travels beside it)."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes()


def unpack_mask(bits: bytes, height: int, width: int) -> np.ndarray:
    """The inverse of :func:`pack_mask`."""
    flat = np.unpackbits(np.frombuffer(bits, np.uint8), count=height * width)
    return flat.view(bool).reshape(height, width)


def _prediction(row: dict[str, Any]) -> Prediction:
    """The model stage's packed answer as the ``Prediction`` the predictor gave."""
    h, w = row["height"], row["width"]
    instances = [InstancePrediction(index=q, score=s, mask=unpack_mask(b, h, w), words=list(zip(words, weights)))
                 for q, s, b, words, weights in zip(row["inst_query"], row["inst_score"], row["inst_bits"],
                                                    row["inst_words"], row["inst_weights"])]
    return Prediction(mask=unpack_mask(row["mask_bits"], h, w), no_target=row["no_target"],
                      no_target_prob=row["no_target_prob"], instances=instances)


def _scored(row: dict[str, Any], prediction: Prediction) -> dict[str, Any]:
    """``iou`` and ``metric_state`` of a row with ground truth; a mask that does not fit its
    image means the prepared split is damaged: the job stops, naming the row."""
    if row["gt_mask"] is None:
        return {"iou": None}
    try:
        gt = rle_decode(row["gt_mask"], row["height"], row["width"])
    except ValueError as e:
        raise BatchPredictError(f"row {row['row_id']}: ground truth mask: {e}") from None
    if gt.shape != prediction.mask.shape:
        raise BatchPredictError(f"row {row['row_id']}: ground truth is {gt.shape}, the image {prediction.mask.shape}")
    metrics = GRESMetrics()
    metrics.update(prediction.mask[None], np.asarray([prediction.no_target]), gt[None],
                   np.asarray([bool(row["gt_no_target"])]),
                   [row["gt_num_targets"]] if row.get("gt_num_targets") is not None else None)
    state = metrics.state_dict()
    return {"iou": float(state["iou_sum"]), "metric_state": json.dumps(state)}  # this row's IoU


def encode_rows(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: ``PREDICTED_SCHEMA`` rows in, :data:`~pipelines.inference.tables.ACTOR_SCHEMA` rows out, in order."""
    out = []
    for row in batch.to_pylist():
        base = {"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"]}
        if row["status"] != "ok":
            out.append({**base, "status": "rejected", "reason": row["reason"], "detail": row["detail"]})
            continue
        prediction = _prediction(row)
        out.append({**base, "width": row["width"], "height": row["height"], **prediction_to_record(prediction),
                    "gt_no_target": row["gt_no_target"], **_scored(row, prediction), "status": "ok"})
    return pa.Table.from_pylist(out, schema=ACTOR_SCHEMA)
