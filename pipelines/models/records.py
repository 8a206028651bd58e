"""The prediction record: one answer of InstAlign as JSON-ready data, and back.

Every way of asking the model answers in this format: the MLflow pyfunc and the Ray Serve
application (``pipelines.models.pyfunc``, ``pipelines.serving.serve``), ``instalign predict`` and batch
prediction (``pipelines.inference.batch``). A record holds ``mask`` (the merged mask, paper eq. 8,
as COCO RLE ``{size: [h, w], counts}``), ``no_target`` / ``no_target_prob`` (eq. 12) and
``instances`` (query, score, bbox, mask, and the words it aligned to, eq. 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instalign.data.masks import rle_decode, rle_encode
from instalign.predictor import InstancePrediction, Prediction

def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(h, w) bool → COCO compressed RLE ``{"size": [h, w], "counts": str}``."""
    mask = np.asarray(mask, dtype=bool)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_encode(mask)}


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a (h, w) bool mask; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def prediction_to_record(prediction) -> dict[str, Any]:
    """One ``instalign.predictor.Prediction`` → the JSON-ready output row."""
    instances = []
    for inst in prediction.instances:
        instances.append({
            "query": int(inst.index),
            "score": float(inst.score),
            "bbox": mask_bbox(inst.mask),
            "mask": mask_to_rle(inst.mask),
            "words": [str(w) for w, _ in inst.words],
            "word_weights": [float(weight) for _, weight in inst.words],
        })
    return {
        "mask": mask_to_rle(prediction.mask),
        "no_target": bool(prediction.no_target),
        "no_target_prob": float(prediction.no_target_prob),
        "instances": instances,
    }


def record_to_prediction(record: dict[str, Any]):
    """The inverse of :func:`prediction_to_record` (masks decoded), e.g. to draw a served answer."""

    def decode(rle: dict[str, Any]) -> np.ndarray:
        h, w = rle["size"]
        return rle_decode(rle["counts"], int(h), int(w))

    instances = [InstancePrediction(index=int(inst["query"]), score=float(inst["score"]), mask=decode(inst["mask"]),
                                    words=list(zip(inst["words"], inst["word_weights"])))
                 for inst in record["instances"]]
    return Prediction(mask=decode(record["mask"]), no_target=bool(record["no_target"]),
                      no_target_prob=float(record["no_target_prob"]), instances=instances)
