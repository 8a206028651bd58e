"""The prediction record (``pipelines.models.records``): one answer as JSON-ready data, and back."""

from __future__ import annotations

import json

import numpy as np

from instalign.predictor import InstancePrediction, Prediction
from pipelines.models.records import mask_bbox, mask_to_rle, prediction_to_record, record_to_prediction


def test_mask_bbox_is_coco_xywh_and_zeros_when_empty():
    mask = np.zeros((6, 8), bool)
    mask[2:5, 3:7] = True
    assert mask_bbox(mask) == [3.0, 2.0, 4.0, 3.0]
    assert mask_bbox(np.zeros((6, 8), bool)) == [0.0, 0.0, 0.0, 0.0]


def test_a_prediction_goes_to_json_and_back_unchanged():
    rng = np.random.default_rng(0)
    merged, one = rng.random((9, 7)) > 0.5, rng.random((9, 7)) > 0.7
    prediction = Prediction(mask=merged, no_target=False, no_target_prob=0.25,
                            instances=[InstancePrediction(index=4, score=0.875, mask=one,
                                                          words=[("red", 0.5), ("cube", 0.25)])])
    record = json.loads(json.dumps(prediction_to_record(prediction)))  # JSON-ready: survives a round trip
    assert record["mask"] == mask_to_rle(merged) and record["mask"]["size"] == [9, 7]
    assert (record["no_target"], record["no_target_prob"]) == (False, 0.25)
    assert record["instances"][0] | {"mask": None} == {"query": 4, "score": 0.875, "bbox": mask_bbox(one), "mask": None,
                                                       "words": ["red", "cube"], "word_weights": [0.5, 0.25]}
    back = record_to_prediction(record)
    assert np.array_equal(back.mask, merged) and np.array_equal(back.instances[0].mask, one)
    assert (back.no_target, back.no_target_prob, back.instances[0].index, back.instances[0].words) == (
        False, 0.25, 4, [("red", 0.5), ("cube", 0.25)])
