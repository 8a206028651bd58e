"""The page's ``POST /explain`` (``pipelines.serving.explain``): a real tiny model, a real image;
the record and the overlay it draws, and each bad body refused in one line."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from instalign.predictor import Predictor
from instalign.visualize import PALETTE
from pipelines.models.limits import PredictionGate, ServingLimits
from pipelines.serving.explain import explain_record, overlay_colours
from pipelines.serving.invocation import RequestError
from tests.support.images import noise_png as png
from tests.support.tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, one_thread):
    return Predictor.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("explain") / "ckpt", score_bias=5.0),
                                     device="cpu")


def explain(predictor, payload) -> tuple[dict, bytes]:
    return explain_record(predictor, json.dumps(payload).encode(), limits=ServingLimits(), gate=PredictionGate(1, 0.0))


def test_an_image_and_an_expression_give_the_record_and_its_overlay(predictor):
    record, drawn = explain(predictor, {"image": base64.b64encode(png(40, 30)).decode(), "text": "the red square"})
    assert record["mask"]["size"] == [30, 40] and {"no_target", "no_target_prob", "instances"} <= set(record)
    overlay = Image.open(io.BytesIO(drawn))
    assert overlay.format == "PNG" and overlay.width == 40 and overlay.height >= 30  # a caption may go below


@pytest.mark.parametrize("payload, message", [
    ([1], "the body must be a JSON object with 'image' and 'text'"),
    ({"text": "a cat"}, "choose an image first"),
    ({"image": "***", "text": "a cat"}, "row 0: 'image' is not valid base64"),
])
def test_a_bad_body_is_a_400_saying_what_is_wrong(predictor, payload, message):
    with pytest.raises(RequestError) as info:
        explain(predictor, payload)
    assert (info.value.status, info.value.message) == (400, message)


def test_the_legend_colours_are_the_overlays_in_order():
    colours = overlay_colours(len(PALETTE) + 1)
    assert colours[0] == "#%02x%02x%02x" % PALETTE[0] and colours[-1] == colours[0]  # the palette wraps
    assert all(len(c) == 7 and c.startswith("#") for c in colours)
