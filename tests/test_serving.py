"""Serving a registered InstAlign model over HTTP with ``mlflow models serve`` (cluster/README.md).

A tiny random-init checkpoint is registered through ``pipelines.pyfunc.log_and_register`` in
a temporary sqlite MLflow store with alias ``champion``; the real model server is started as
a subprocess on loopback (``-h 127.0.0.1``, a free port) and driven over HTTP:

* a good request (base64 image bytes in ``dataframe_split`` + an expression) answers a mask
  whose RLE decodes to the image's own size, and the no-target fields;
* bad input at the boundary — bytes that are not an image, an empty expression, one over the
  token limit, an oversized image, a missing column — is a 4xx whose message names the
  problem and carries no Python stack trace; the server keeps answering afterwards;
* the registry model (in-process and over HTTP) gives the checkpoint's ``Predictor``'s answers.

The server is stopped by terminating its process group.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODEL_NAME = "instalign-serving-test"
IMAGE_SIZE = (97, 61)  # (w, h): odd, non-square, unlike the model's 128×128 input


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new(mode, size, 40 if mode == "L" else (40, 60, 80))
    if max(size) < 1000:
        draw = ImageDraw.Draw(img)
        draw.ellipse([10, 8, 45, 40], fill=(220, 40, 40))
        draw.rectangle([55, 20, 90, 55], fill=(40, 200, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny random-init checkpoint, registered as ``models:/MODEL_NAME@champion``."""
    import mlflow
    import torch

    from instalign.checkpoint import save_checkpoint
    from instalign.config import tiny
    from instalign.modeling.builders import build_model
    from instalign.modeling.text_encoder import load_tokenizer
    from pipelines.pyfunc import log_and_register

    root = tmp_path_factory.mktemp("serving")
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    checkpoint = save_checkpoint(root / "checkpoint", model, cfg, tokenizer=load_tokenizer(cfg.model.text_encoder))

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment("serving-test")
        version = log_and_register(checkpoint, registered_model_name=MODEL_NAME, alias="champion")
    finally:
        mlflow.set_tracking_uri(previous)
    return {"checkpoint": checkpoint, "tracking_uri": tracking_uri, "version": version.version, "root": root}


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log_path: Path):
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1")
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"model server not ready on {url} after 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def invoke(url: str, columns: list[str], rows: list[list]) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"message": text}


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
    from pipelines.pyfunc import prediction_to_record

    predictor = Predictor.from_checkpoint(registered["checkpoint"], device="cpu")
    return prediction_to_record(predictor.predict(_png(IMAGE_SIZE), "the red ball on the left"))


def test_registry_model_matches_the_checkpoint_predictor(registered, expected):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(registered["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = model.predict(pd.DataFrame({"image": [_png(IMAGE_SIZE)], "text": ["the red ball on the left"]}))
    got = out.iloc[0].to_dict()
    got = json.loads(json.dumps(got, default=lambda o: o.tolist() if hasattr(o, "tolist") else o))
    # Same process, same weights, same transform: identical, not merely close.
    assert got == expected


@pytest.fixture(scope="module")
def server(registered):
    with model_server(f"models:/{MODEL_NAME}@champion", registered["tracking_uri"],
                      registered["root"] / "server.log") as url:
        yield url


GOOD = (["image", "text"], [[_b64(_png(IMAGE_SIZE)), "the red ball on the left"]])

#: Bad input at the boundary → (columns, rows), a phrase the error message must contain.
BAD = {
    "not-an-image": ((["image", "text"], [[_b64(b"these bytes are no image at all"), "the ball"]]),
                     "not a readable image"),
    "empty-expression": ((["image", "text"], [[_b64(_png(IMAGE_SIZE)), ""]]), "non-empty"),
    "expression-over-token-limit": ((["image", "text"], [[_b64(_png(IMAGE_SIZE)), " ".join(["ball"] * 60)]]),
                                    "token"),
    "huge-image": ((["image", "text"], [[_b64(_png((7000, 6000), mode="L")), "the ball"]]), "pixels"),
    "missing-text-column": ((["image"], [[_b64(_png(IMAGE_SIZE))]]), "text"),
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
