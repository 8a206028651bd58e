"""Serving a registered InstAlign model over HTTP with ``mlflow models serve`` (cluster/README.md).

A tiny random-init checkpoint is registered through ``pipelines.models.pyfunc.log_and_register`` in
a temporary sqlite MLflow store with alias ``champion``; the real model server is started as
a subprocess on loopback (``-h 127.0.0.1``, a free port) and driven over HTTP:

* a good request (base64 image bytes in ``dataframe_split`` + an expression) answers a mask
  whose RLE decodes to the image's own size, and the no-target fields;
* bad input at the boundary — bytes that are not an image, an empty expression, one over the
  token limit, an oversized image, a missing column — is a 4xx whose message names the
  problem and carries no Python stack trace; the server keeps answering afterwards;
* the registry model (in-process and over HTTP) gives the checkpoint's ``Predictor``'s answers.

The server (``tests/support/model_server.py``) is stopped by terminating its process group.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.support.mlflow_store import tracking_store
from tests.support.model_server import invoke, model_server
from tests.support.serve_fixtures import png, post

pytestmark = pytest.mark.slow

MODEL_NAME = "instalign-serving-test"
IMAGE_SIZE = (97, 61)  # (w, h): odd, non-square, unlike the model's 128×128 input


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny random-init checkpoint, registered as ``models:/MODEL_NAME@champion``."""
    import torch

    from instalign.checkpoint import save_checkpoint
    from instalign.config import tiny
    from instalign.modeling.builders import build_model
    from instalign.modeling.text_encoder import load_tokenizer
    from pipelines.models.registry import log_and_register

    root = tmp_path_factory.mktemp("serving")
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    checkpoint = save_checkpoint(root / "checkpoint", model, cfg, tokenizer=load_tokenizer(cfg.model.text_encoder))

    with tracking_store(root, "serving-test") as tracking_uri:
        version = log_and_register(checkpoint, registered_model_name=MODEL_NAME, alias="champion")
    return {"checkpoint": checkpoint, "tracking_uri": tracking_uri, "version": version.version, "root": root}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _close(got: dict, want: dict) -> None:
    """Same masks, flags and words; probabilities equal up to float noise across processes."""
    assert got["mask"] == want["mask"]
    assert got["no_target"] == want["no_target"]
    assert got["no_target_prob"] == pytest.approx(want["no_target_prob"], abs=1e-5)
    assert len(got["instances"]) == len(want["instances"])
    for g, w in zip(got["instances"], want["instances"]):
        assert g["mask"] == w["mask"] and g["bbox"] == w["bbox"] and g["words"] == w["words"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)


@pytest.fixture(scope="module")
def expected(registered):
    """What the checkpoint's own Predictor answers for the good request."""
    from instalign.predictor import Predictor
    from pipelines.models.records import prediction_to_record

    predictor = Predictor.from_checkpoint(registered["checkpoint"], device="cpu")
    return prediction_to_record(predictor.predict(png(IMAGE_SIZE), "the red ball on the left"))


def test_registry_model_matches_the_checkpoint_predictor(registered, expected):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(registered["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = model.predict(pd.DataFrame({"image": [png(IMAGE_SIZE)], "text": ["the red ball on the left"]}))
    got = out.iloc[0].to_dict()
    got = json.loads(json.dumps(got, default=lambda o: o.tolist() if hasattr(o, "tolist") else o))
    # Same process, same weights, same transform: identical, not merely close.
    assert got == expected


@pytest.fixture(scope="module")
def server(registered):
    with model_server(f"models:/{MODEL_NAME}@champion", registered["tracking_uri"],
                      registered["root"] / "server.log") as (url, _):
        yield url


GOOD = (["image", "text"], [[_b64(png(IMAGE_SIZE)), "the red ball on the left"]])

#: Bad input at the boundary → (columns, rows), a phrase the error message must contain.
BAD = {
    "not-an-image": ((["image", "text"], [[_b64(b"these bytes are no image at all"), "the ball"]]),
                     "not a readable image"),
    "empty-expression": ((["image", "text"], [[_b64(png(IMAGE_SIZE)), ""]]), "non-empty"),
    "expression-over-token-limit": ((["image", "text"], [[_b64(png(IMAGE_SIZE)), " ".join(["ball"] * 60)]]),
                                    "token"),
    "expression-over-character-limit": ((["image", "text"], [[_b64(png(IMAGE_SIZE)), "ball " * 500]]),
                                        "2500 characters, above the limit of 2000 characters"),
    "huge-image": ((["image", "text"], [[_b64(png((7000, 6000), mode="L")), "the ball"]]), "pixels"),
    "missing-text-column": ((["image"], [[_b64(png(IMAGE_SIZE))]]), "text"),
    "missing-image-column": ((["text"], [["the ball"]]), "image"),
}


def test_http_good_request(server, expected):
    from pycocotools import mask as mask_utils

    status, body = invoke(server, *GOOD)
    assert status == 200, body
    (row,) = body["predictions"]
    decoded = mask_utils.decode({"size": row["mask"]["size"], "counts": row["mask"]["counts"].encode()})
    assert decoded.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])  # (h, w) of the image sent, not the model's input
    assert isinstance(row["no_target"], bool) and 0.0 <= row["no_target_prob"] <= 1.0
    assert row["no_target"] == (row["no_target_prob"] > 0.5)
    if row["no_target"]:
        assert not decoded.any()
    _close(row, expected)  # the served model is the checkpoint's Predictor


@pytest.mark.parametrize("case", sorted(BAD))
def test_http_bad_input_is_a_clean_4xx(server, case):
    (columns, rows), needle = BAD[case]
    status, body = invoke(server, columns, rows)
    text = json.dumps(body)
    assert 400 <= status < 500, f"HTTP {status}: {text[:500]}"
    assert needle in str(body.get("message", "")), f"the message does not name the problem ({needle!r}): {text[:500]}"
    assert "Traceback" not in text and "stack_trace" not in body, f"the response leaks a stack trace: {text[:500]}"


def test_http_still_serving_after_bad_inputs(server, expected):
    for (columns, rows), _ in BAD.values():  # whatever the order tests ran in
        invoke(server, columns, rows)
    status, body = invoke(server, *GOOD)
    assert status == 200, body
    _close(body["predictions"][0], expected)
    assert np.isfinite(body["predictions"][0]["no_target_prob"])


def test_http_image_path_is_refused_alike_for_any_path(server):
    """No image root configured: ``image_path`` is a 400 whose words are the same whether the
    path exists (``/etc/passwd``) or not — the server reads nothing and reveals nothing."""
    answers = {}
    for path in ("/etc/passwd", "/nonexistent", "/dev/zero"):
        status, body = invoke(server, ["image_path", "text"], [[path, "the ball"]])
        assert status == 400, body
        assert "root:" not in json.dumps(body)  # nothing of the file comes back
        answers[path] = body["message"].split("Error: ", 1)[-1].replace(repr(path), "<path>")
    assert len(set(answers.values())) == 1, answers
    assert "does not read 'image_path'" in answers["/etc/passwd"]


def test_http_limits_are_413_with_the_limit_named(server):
    rows = [[_b64(png((8, 8))), "the ball"]] * 17  # default: 16 rows per request
    status, body = invoke(server, ["image", "text"], rows)
    assert status == 413, body
    assert "the request has 17 rows, above the limit of 16 rows per request (INSTALIGN_SERVING_MAX_ROWS)" \
        in body["message"]
    assert "stack_trace" not in body


def test_http_cross_site_simple_posts_are_refused(server):
    """A page on another site may POST ``text/plain`` or a form to a server on the user's
    loopback without a CORS preflight; MLflow's scoring server answers 415 to each (it reads
    JSON, CSV and Parquet only), so the model never runs for one (docs/security.md)."""
    body = json.dumps({"dataframe_split": {"columns": GOOD[0], "data": GOOD[1]}}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, answer = post(server + "/invocations", body, content_type=content_type)
        assert status == 415, (content_type, status, answer)
