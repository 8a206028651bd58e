"""Batch prediction's encode stage (``pipelines.inference.encode``), and the three stages called
in turn on Arrow batches (no Ray cluster): decode, model (``pipelines.inference.actor.ModelStage``)
and encode. A row rejected at any stage reaches the last one with its reason, in its place;
the good rows' answers equal the checkpoint's own ``Predictor``'s."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from instalign.predictor import Predictor
from pipelines.inference.actor import ModelStage
from pipelines.inference.decode import decode_rows
from pipelines.inference.encode import encode_rows, pack_mask, unpack_mask
from pipelines.inference.tables import ACTOR_SCHEMA, INPUT_SCHEMA, PREDICTED_SCHEMA
from pipelines.models.records import prediction_to_record
from tests.support.batch_rows import row
from tests.support.images import noise_png as png
from tests.support.tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("stages") / "ckpt", score_bias=4.0, no_target_bias=-4.0))


def test_rejects_of_every_stage_reach_the_output_and_the_counts_add_up(checkpoint, tmp_path, one_thread):
    (tmp_path / "a.png").write_bytes(png(40, 30))
    long_text = " ".join(["ball"] * 80)  # under the character limit: refused by the model stage's token count
    batch = pa.Table.from_pylist([
        row("good", image_path=str(tmp_path / "a.png")),
        row("missing", image_path=str(tmp_path / "gone.png")),
        row("long", image=png(40, 30), text=long_text),
        row("long-and-missing", image_path=str(tmp_path / "gone.png"), text=long_text),  # the text is named first
        row("good2", image=png(24, 36), text="the thing at the top"),
    ], schema=INPUT_SCHEMA)
    model = ModelStage(checkpoint=checkpoint, device="cpu")
    predicted = model(decode_rows(batch))
    assert predicted.schema == PREDICTED_SCHEMA
    out = encode_rows(predicted)
    assert out.schema == ACTOR_SCHEMA and out.num_rows == batch.num_rows
    got = {r["row_id"]: r for r in out.to_pylist()}
    assert list(got) == ["good", "missing", "long", "long-and-missing", "good2"]
    assert {k: (r["status"], r["reason"]) for k, r in got.items()} == {
        "good": ("ok", None), "missing": ("rejected", "missing_image"), "long": ("rejected", "text_too_long"),
        "long-and-missing": ("rejected", "text_too_long"), "good2": ("ok", None)}
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for rid, image, text in (("good", str(tmp_path / "a.png"), "the red square"),
                             ("good2", png(24, 36), "the thing at the top")):
        want = prediction_to_record(predictor.predict(image, text))
        assert want["instances"], "the biased checkpoint keeps instances: their packed masks are exercised"
        assert got[rid]["mask"] == want["mask"] and got[rid]["no_target"] == want["no_target"]
        assert [(i["query"], i["mask"], i["bbox"], i["words"]) for i in got[rid]["instances"]] == \
            [(i["query"], i["mask"], i["bbox"], i["words"]) for i in want["instances"]]


def test_packed_masks_round_trip_at_any_shape():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (3, 5), (30, 41)):
        mask = rng.random((h, w)) > 0.5
        assert np.array_equal(unpack_mask(pack_mask(mask), h, w), mask)
