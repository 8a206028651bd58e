"""Batch prediction's model stage (``pipelines.inference.actor.ModelStage``) between its decode
and encode stages, called directly on Arrow batches: a real tiny checkpoint, real image bytes
and files, no Ray cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from instalign.data.masks import rle_encode
from pipelines.inference.actor import ModelStage
from pipelines.inference.decode import decode_rows
from pipelines.inference.encode import encode_rows
from pipelines.inference.tables import ACTOR_SCHEMA, INPUT_SCHEMA, BatchPredictError
from tests.support.batch_rows import row
from tests.support.images import noise_png as png
from tests.support.tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def actor(tmp_path_factory, one_thread):
    """The three stages in turn, as the pipeline runs them: input rows in, output rows out."""
    model = ModelStage(checkpoint=str(make_checkpoint(tmp_path_factory.mktemp("actor") / "ckpt")), device="cpu")
    return lambda batch: encode_rows(model(decode_rows(batch)))


def test_good_rows_are_predicted_together_and_bad_ones_rejected_with_a_reason(actor, tmp_path):
    (tmp_path / "a.png").write_bytes(png(40, 30))
    (tmp_path / "fake.png").write_bytes(b"not an image")
    gt = np.zeros((30, 40), bool)
    gt[5:20, 10:30] = True
    batch = pa.Table.from_pylist([
        row("bytes", image=png(40, 30), gt_mask=rle_encode(gt), gt_no_target=False, gt_num_targets=1),
        row("file", image_path=str(tmp_path / "a.png")),
        row("empty", image=png(40, 30), text="  "),
        row("nothing"),
        row("missing", image_path=str(tmp_path / "gone.png")),
        row("garbage", image_path=str(tmp_path / "fake.png")),
    ], schema=INPUT_SCHEMA)
    out = actor(batch)
    assert out.schema == ACTOR_SCHEMA
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert list(rows) == ["bytes", "file", "empty", "nothing", "missing", "garbage"]  # order kept
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "bytes": ("ok", None), "file": ("ok", None), "empty": ("rejected", "empty_text"),
        "nothing": ("rejected", "missing_image"), "missing": ("rejected", "missing_image"),
        "garbage": ("rejected", "unreadable_image")}
    assert rows["nothing"]["detail"] == "row nothing: no image bytes and no image_path"
    assert rows["missing"]["detail"].startswith("row missing: image_path ") and "does not exist" in rows["missing"]["detail"]
    assert (rows["bytes"]["width"], rows["bytes"]["height"]) == (40, 30) and rows["bytes"]["mask"]["size"] == [30, 40]
    assert 0.0 <= rows["bytes"]["iou"] <= 1.0 and json.loads(rows["bytes"]["metric_state"])["samples"] == 1
    assert rows["file"]["iou"] is None and rows["file"]["metric_state"] is None



def test_a_ground_truth_that_does_not_fit_its_image_names_the_row(actor):
    gt = np.zeros((60, 80), bool)  # the image is 40 x 30
    gt[5:50, 10:70] = True
    batch = pa.Table.from_pylist([row("mismatch", image=png(40, 30), gt_mask=rle_encode(gt), gt_no_target=False)],
                                 schema=INPUT_SCHEMA)
    with pytest.raises(BatchPredictError, match=r"^row mismatch: ground truth mask: "):
        actor(batch)
