"""The serving boundary in process: image paths under the operator's root only, request limits
checked before decoding, bounded concurrent predictions, limits from the environment.

One real registered model (tiny random checkpoint, sqlite MLflow store) loaded through
``mlflow.pyfunc.load_model`` with limits set per test through ``model_config``; the HTTP side
(status codes from a real ``mlflow models serve``, memory under concurrent load) is in
``tests/pipelines/models/test_limits_memory.py``.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time

import pandas as pd
import pytest
from PIL import Image

from tests.support.mlflow_store import tracking_store
from tests.support.images import noise_png as png
from tests.support.tiny_checkpoint import make_checkpoint

MODEL_NAME = "instalign-serving-limits"


def header_only_png(w: int, h: int) -> bytes:
    """A PNG whose header says ``w``×``h`` but that holds no pixel data: reading its size works,
    decoding it fails — so a 413 (not a 400 'not a readable image') proves nothing was decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[:data.index(b"IDAT") + 12]  # the headers, then 8 bytes of the first pixel chunk


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    from pipelines.models.registry import log_and_register

    root = tmp_path_factory.mktemp("serving_limits")
    with tracking_store(root, "serving-limits"):
        log_and_register(make_checkpoint(root / "ckpt"), registered_model_name=MODEL_NAME, alias="candidate")
        yield f"models:/{MODEL_NAME}@candidate"


@pytest.fixture(scope="module")
def local_model_dir(model_uri, tmp_path_factory):
    """The registered model downloaded once; loading it again with other limits is then cheap."""
    import mlflow

    return mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path_factory.mktemp("model")))


def load(local_model_dir, **limits):
    import mlflow

    return mlflow.pyfunc.load_model(local_model_dir, model_config=limits)


@pytest.fixture(scope="module")
def default_model(local_model_dir):
    return load(local_model_dir)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An image root with a photo, a nested photo, and the ways out of it an attacker would try."""
    root = tmp_path_factory.mktemp("image_root")
    (root / "photo.png").write_bytes(png(40, 30))
    (root / "sub").mkdir()
    (root / "sub" / "nested.png").write_bytes(png(20, 10))
    (root / "passwd_link").symlink_to("/etc/passwd")
    (root / "zero_link").symlink_to("/dev/zero")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(png(8, 8))
    (root / "outside_link").symlink_to(outside)
    os.mkfifo(root / "fifo.png")
    (root / "big.png").write_bytes(png(16, 16) + b"\0" * 30_000)
    return root


@pytest.fixture(scope="module")
def rooted_model(local_model_dir, root):
    return load(local_model_dir, image_root=str(root), max_request_bytes=20_000)


def refusal(model, frame) -> Exception:
    with pytest.raises(Exception) as info:
        model.predict(frame)
    return info.value


def one_row(**columns) -> pd.DataFrame:
    return pd.DataFrame({"text": ["the object"], **{k: [v] for k, v in columns.items()}})


# --- image_path ------------------------------------------------------------------------------

def test_image_path_refused_without_a_root_and_the_refusal_says_nothing_about_the_file(default_model):
    from pipelines.models.limits import PyfuncInputError

    messages = []
    for path in ("/etc/passwd", "/nonexistent/x.png", "/dev/zero", "/etc"):
        err = refusal(default_model, one_row(image_path=path))
        assert isinstance(err, PyfuncInputError) and err.get_http_status_code() == 400
        messages.append(str(err.message))
    assert len(set(messages)) == 1, messages
    assert "does not read 'image_path'" in messages[0] and "INSTALIGN_SERVING_IMAGE_ROOT" in messages[0]


def test_image_path_under_the_root(rooted_model, root):
    from instalign.predictor import Predictor  # noqa: F401  (the model's own code is imported)

    frame = pd.DataFrame({"image_path": ["photo.png", str(root / "sub" / "nested.png"), "sub/../photo.png"],
                          "text": ["a", "b", "c"]})
    out = rooted_model.predict(frame)
    assert [row["size"] for row in out["mask"]] == [[30, 40], [10, 20], [30, 40]]


@pytest.mark.parametrize("path", [
    "/etc/passwd",               # outside, exists
    "/nonexistent/x.png",        # outside, missing
    "missing.png",               # inside, missing
    "../../../../etc/passwd",    # climbs out
    "passwd_link",               # symlink inside → file outside
    "outside_link",              # symlink inside → an image outside
    "zero_link",                 # symlink → /dev/zero (would read forever)
    "fifo.png",                  # FIFO inside (would block forever)
    "sub",                       # a directory
    "photo.png\0.txt",           # NUL byte
])
def test_image_path_refusals_are_identical(rooted_model, root, path):
    from pipelines.models.limits import PyfuncInputError

    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(refusal(rooted_model, one_row(image_path=path))),
                              daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert outcome, f"predict on image_path {path!r} did not return (blocked on the file?)"
    err = outcome[0]
    assert isinstance(err, PyfuncInputError) and err.get_http_status_code() == 400
    # The same words for every path, whatever exists behind it (the path itself is the client's).
    assert err.message == f"row 0: image_path {path!r} is not a readable image file under the server's image root"


def test_image_path_file_counts_toward_the_payload_limit(rooted_model):
    err = refusal(rooted_model, one_row(image_path="big.png"))
    assert err.get_http_status_code() == 413
    assert re.search(r"image_path 'big.png' is \d+ bytes, more than the \d+ bytes left of the request's payload "
                     r"limit \(INSTALIGN_SERVING_MAX_REQUEST_BYTES\)", err.message), err.message


# --- request limits: checked before anything is decoded ----------------------------------------

def test_too_many_rows_is_413(local_model_dir):
    model = load(local_model_dir, max_rows=3)
    frame = pd.DataFrame({"image": [png(8, 8)] * 4, "text": ["a"] * 4})
    err = refusal(model, frame)
    assert err.get_http_status_code() == 413
    assert "the request has 4 rows, above the limit of 3 rows per request (INSTALIGN_SERVING_MAX_ROWS)" in err.message
    assert len(model.predict(frame.iloc[:3])) == 3


def test_payload_bytes_over_the_limit_is_413(local_model_dir):
    model = load(local_model_dir, max_request_bytes=1000)
    data = png(16, 16)
    rows = 1000 // len(data) + 1
    err = refusal(model, pd.DataFrame({"image": [data] * rows, "text": ["a"] * rows}))
    assert err.get_http_status_code() == 413 and "INSTALIGN_SERVING_MAX_REQUEST_BYTES" in err.message
    assert f"are {rows * (len(data) + 1)} bytes, above the limit of 1000 bytes per request" in err.message


def test_pixels_summed_over_rows_are_checked_from_headers_before_decoding(local_model_dir):
    model = load(local_model_dir, max_pixels=1_000_000)
    # Each 800×800 image is under the budget on its own; two are not. The images hold no pixel
    # data at all: had the model decoded one, the answer would be 400 'not a readable image'.
    err = refusal(model, pd.DataFrame({"image": [header_only_png(800, 800)] * 2, "text": ["a", "b"]}))
    assert err.get_http_status_code() == 413, err.message
    assert "decode to more than 1000000 pixels (1280000 up to row 1; limit INSTALIGN_SERVING_MAX_PIXELS)" in err.message
    err = refusal(model, pd.DataFrame({"image": [header_only_png(800, 800)], "text": ["a"]}))
    assert err.get_http_status_code() == 400 and "not a readable image" in err.message  # within budget: decoded


def test_single_image_cap_still_applies(default_model, monkeypatch):
    import pipelines.models.pyfunc as pyfunc

    monkeypatch.setattr(pyfunc, "MAX_PIXELS", 100 * 100 - 1)
    err = refusal(default_model, one_row(image=header_only_png(100, 100)))
    assert err.get_http_status_code() == 400 and "100x100 = 10000 pixels, above the limit of 9999" in err.message


# --- concurrency -------------------------------------------------------------------------------

def test_a_request_that_finds_no_slot_in_time_is_503(local_model_dir):
    from pipelines.models.limits import ServerBusy

    model = load(local_model_dir, max_concurrent=1, queue_timeout_s=0.2)
    gate = model.unwrap_python_model().gate
    with gate.slot():  # another request is predicting
        started = time.monotonic()
        err = refusal(model, one_row(image=png(8, 8)))
        waited = time.monotonic() - started
    assert isinstance(err, ServerBusy) and err.get_http_status_code() == 503
    assert "the server is busy: 1 prediction(s) running and no slot freed up within 0.2 s" in err.message
    assert waited >= 0.2  # it did wait for a slot before giving up
    assert len(model.predict(one_row(image=png(8, 8)))) == 1  # the slot is back


def test_concurrent_requests_predict_one_at_a_time(local_model_dir):
    """Six threads (as the scoring server's pool would run them) through a one-slot model: the
    predictor never runs two requests at once, and every request is answered."""
    model = load(local_model_dir, max_concurrent=1, queue_timeout_s=120)
    predictor = model.unwrap_python_model().predictor
    real, running, peak, lock = predictor.predict_batch, [0], [0], threading.Lock()

    def counting(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)  # widen the window in which an unbounded server would overlap
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    predictor.predict_batch = counting
    results, errors = [], []

    def request(seed):
        try:
            results.append(model.predict(one_row(image=png(64, 48, seed))))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=request, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 6
    assert peak[0] == 1


# --- configuration -----------------------------------------------------------------------------

def test_limits_from_environment_model_config_and_defaults(tmp_path):
    from pipelines.models.limits import ServingConfigError, ServingLimits

    assert ServingLimits.load(environ={}) == ServingLimits()
    env = {"INSTALIGN_SERVING_MAX_ROWS": "4", "INSTALIGN_SERVING_MAX_TEXT_CHARS": "500",
           "INSTALIGN_SERVING_MAX_REQUEST_BYTES": "1_000_000",
           "INSTALIGN_SERVING_MAX_PIXELS": "2000000", "INSTALIGN_SERVING_MAX_CONCURRENT": "2",
           "INSTALIGN_SERVING_QUEUE_TIMEOUT_S": "1.5", "INSTALIGN_SERVING_IMAGE_ROOT": str(tmp_path)}
    limits = ServingLimits.load(environ=env)
    assert limits == ServingLimits(max_rows=4, max_text_chars=500, max_request_bytes=1_000_000, max_pixels=2_000_000, max_concurrent=2,
                                   queue_timeout_s=1.5, image_root=os.path.realpath(tmp_path))
    # model_config wins over the environment; None keys (as logged) fall back to it.
    assert ServingLimits.load({"max_rows": 8, "max_pixels": None}, environ=env).max_rows == 8
    assert ServingLimits.load({"max_rows": 8, "max_pixels": None}, environ=env).max_pixels == 2_000_000
    with pytest.raises(ServingConfigError, match=r"INSTALIGN_SERVING_MAX_ROWS='many': expected a number"):
        ServingLimits.load(environ={"INSTALIGN_SERVING_MAX_ROWS": "many"})
    with pytest.raises(ServingConfigError, match=r"max_concurrent \(INSTALIGN_SERVING_MAX_CONCURRENT\) must be a "
                                                 r"positive integer, got 0"):
        ServingLimits.load(environ={"INSTALIGN_SERVING_MAX_CONCURRENT": "0"})
    with pytest.raises(ServingConfigError, match=r"is not a directory"):
        ServingLimits.load(environ={"INSTALIGN_SERVING_IMAGE_ROOT": str(tmp_path / "missing")})


def test_limits_reach_the_model_from_the_environment(local_model_dir, monkeypatch):
    monkeypatch.setenv("INSTALIGN_SERVING_MAX_ROWS", "2")
    model = load(local_model_dir)
    assert model.unwrap_python_model().limits.max_rows == 2
    err = refusal(model, pd.DataFrame({"image": [png(8, 8)] * 3, "text": ["a"] * 3}))
    assert err.get_http_status_code() == 413


# --- texts: their length checked before the tokenizer sees them ---------------------------------

def test_a_huge_text_is_a_400_before_it_is_tokenized_or_waits_for_a_slot(local_model_dir):
    """4 MiB of text: refused at once, by its length in characters, naming the row and the limit
    (tokenizing it took 8 s and +0.5 GiB); the refusal does not echo it. A text within the limit
    but over the model's token limit is tokenized inside a prediction slot, so it waits for one."""
    from pipelines.models.limits import PyfuncInputError, ServerBusy

    model = load(local_model_dir, max_concurrent=1, queue_timeout_s=0.2)
    huge = ("the red ball " * (4 * 2**20 // 13 + 1))[:4 * 2**20]
    frame = pd.DataFrame({"image": [png(8, 8)] * 2, "text": ["the ball", huge]})
    with model.unwrap_python_model().gate.slot():  # another request is predicting
        started = time.monotonic()
        err = refusal(model, frame)
        assert time.monotonic() - started < 0.2  # did not wait for the slot
        assert isinstance(err, PyfuncInputError) and err.get_http_status_code() == 400
        assert re.fullmatch(r"row 1: 'text' 'the red ball the red ball .{20,40}… is 4194304 characters, above the "
                            r"limit of 2000 characters \(INSTALIGN_SERVING_MAX_TEXT_CHARS\); shorten it",
                            err.message), err.message
        over_tokens = " ".join(["ball"] * 60)  # 299 characters, 63 tokens
        assert isinstance(refusal(model, one_row(image=png(8, 8), text=over_tokens)), ServerBusy)
    err = refusal(model, one_row(image=png(8, 8), text=over_tokens))  # the slot is free: tokenized, refused
    assert err.get_http_status_code() == 400 and "63 tokens, longer than the model's limit" in err.message


def test_the_text_limit_is_configurable_and_a_lone_surrogate_is_a_clean_400(local_model_dir):
    from pipelines.models.limits import PyfuncInputError

    err = refusal(load(local_model_dir, max_text_chars=10), one_row(image=png(8, 8), text="the red ball"))
    assert "is 12 characters, above the limit of 10 characters" in err.message
    # pandas' string columns cannot hold a lone surrogate; an object column can.
    frame = pd.DataFrame({"image": [png(8, 8)], "text": ["the \ud800 ball"]}, dtype=object)
    err = refusal(load(local_model_dir), frame)
    assert isinstance(err, PyfuncInputError), err  # was a TypeError from the tokenizer
    assert err.message == "row 0: 'text' is not valid Unicode (surrogates not allowed at character 4)"


# --- the page's /explain: everything that grows with the image inside the slot ---------------------

def test_explain_decodes_and_draws_its_overlay_inside_the_prediction_slot(default_model, monkeypatch):
    import base64
    import json

    from pipelines.models.limits import PredictionGate, ServerBusy, ServingLimits
    from pipelines.serving import explain
    from pipelines.serving.explain import explain_record

    gate = PredictionGate(1, 0.0)
    slot_taken = []
    real_overlay = explain.overlay

    def overlay(*args, **kwargs):  # records whether a request could take the (only) slot now
        try:
            with gate.slot():
                slot_taken.append(False)
        except ServerBusy:
            slot_taken.append(True)
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(explain, "overlay", overlay)
    body = json.dumps({"image": base64.b64encode(png(40, 30)).decode(), "text": "the object"}).encode()
    record, drawn = explain_record(default_model.unwrap_python_model().predictor, body, limits=ServingLimits(),
                                   gate=gate)
    assert slot_taken == [True]
    assert Image.open(io.BytesIO(drawn)).width == 40 and record["mask"]["size"] == [30, 40]  # + a caption below
