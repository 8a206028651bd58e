"""Fuzz: prediction requests through both servers' parsers (issue "no input that crashes").

* **pyfunc** (``mlflow models serve``): MLflow decodes the JSON into a DataFrame and calls
  ``predict``, which is ``pipelines.models.pyfunc.predict_records``. Fuzzed frames mix the right
  columns with junk ones, and right values with every JSON type, NaN, bytes that are no
  image, texts over the token limit, paths that leave the image root; up to one row more
  than ``max_rows``.
* **Ray Serve** (``instalign serve``): ``POST /invocations`` runs
  ``pipelines.serving.invocation.parse_invocation`` on the body, then the same ``predict_records``
  (``pipelines.serving.serve.InstAlignService.invocations``; no Ray is started here — the handler
  adds only the status mapping, reproduced in :func:`_serve_status`). Bodies are MLflow's two
  layouts filled with fuzzed values, other JSON, and byte-mutated JSON.

Property: a list of JSON-serialisable records (one per row) or the server's clean refusal —
an ``MlflowException`` / ``RequestError`` with a 4xx status; never another exception, never 5xx.
The predictor is a real tiny random checkpoint, so valid rows run the model.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
import json
import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests.support.fuzz_support import TALLY_PATH, fuzz_settings, run_case
from tests.support.tiny_checkpoint import make_checkpoint

MAX_ROWS = 3


def _image(fmt: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 160, 90)).save(buf, format=fmt)
    return buf.getvalue()


GOOD_IMAGES = [_image("PNG", (8, 6)), _image("JPEG", (16, 12))]
GOOD_TEXTS = ["the dog", "all people on the left"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, one_thread):
    from instalign.predictor import Predictor

    return Predictor.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt"), device="cpu")


@pytest.fixture(scope="module")
def limits(tmp_path_factory):
    """Serving limits over an image root holding a photo, a link out, a FIFO and an oversize file."""
    from pipelines.models.limits import ServingLimits

    root = tmp_path_factory.mktemp("fuzz_image_root")
    (root / "photo.png").write_bytes(GOOD_IMAGES[0])
    (root / "sub").mkdir()
    (root / "sub" / "nested.jpg").write_bytes(GOOD_IMAGES[1])
    (root / "passwd_link").symlink_to("/etc/passwd")
    (root / "zero_link").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.png")
    (root / "big.png").write_bytes(GOOD_IMAGES[0] + b"\0" * 70_000)
    return ServingLimits(max_rows=MAX_ROWS, max_request_bytes=64_000, max_pixels=4_000, image_root=str(root))


def _json_scalars():
    return st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)


_JSON = st.recursive(_json_scalars(), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_PATHS = st.sampled_from(["photo.png", "sub/nested.jpg", "sub/../photo.png", "../photo.png", "/etc/passwd",
                          "passwd_link", "zero_link", "fifo.png", "big.png", "sub", ".", "", "missing.png",
                          "photo.png\x00.txt", "~/photo.png", "//photo.png"]) | st.text(max_size=30)
_TEXTS = (st.sampled_from(GOOD_TEXTS) | st.text(max_size=60) | st.just("word " * 40) | st.just("   ")
          | st.just(float("nan")) | _JSON)


def _image_bytes():
    mutated = st.tuples(st.sampled_from(GOOD_IMAGES), st.integers(0, 40), st.binary(max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    return st.sampled_from(GOOD_IMAGES) | mutated | st.binary(max_size=40)


_IMAGES = _image_bytes() | st.just(float("nan")) | _JSON
#: Column → values; ``junk`` stands for any column the model does not read.
_COLUMNS = {"text": _TEXTS, "image": _IMAGES, "image_path": _PATHS | _JSON, "junk": _JSON}


#: Column → a value a well-formed request holds there.
_GOOD = {"text": st.sampled_from(GOOD_TEXTS), "image": st.sampled_from(GOOD_IMAGES),
         "image_path": st.sampled_from(["photo.png", "sub/nested.jpg"]), "junk": _JSON}


@st.composite
def frames(draw):
    """A DataFrame as MLflow builds one from a request: 0..MAX_ROWS+1 rows of some of the columns.

    Half the cases are near-valid requests (``text`` and an image column, each cell well-formed
    three times in four), so the fuzzing also reaches the checks that run after the first
    refusal a random request meets, and the model.
    """
    import pandas as pd

    if draw(st.booleans()):
        names = ["text", draw(st.sampled_from(["image", "image_path"]))] + draw(st.lists(
            st.sampled_from(sorted(_COLUMNS)), unique=True, max_size=2))
        cells = {name: _GOOD[name] | _GOOD[name] | _GOOD[name] | _COLUMNS[name] for name in dict.fromkeys(names)}
    else:
        cells = {name: _COLUMNS[name] for name in draw(st.lists(st.sampled_from(sorted(_COLUMNS)), unique=True,
                                                                max_size=4))}
    rows = draw(st.integers(0, MAX_ROWS + 1))
    return pd.DataFrame({name: [draw(values) for _ in range(rows)] for name, values in cells.items()},
                        index=range(rows), dtype=object)


def _check_records(records, rows: int):
    assert isinstance(records, list) and len(records) == rows, (type(records), rows)
    json.dumps(records)  # the server sends them as JSON
    return records


@fuzz_settings()
@given(frame=frames())
def test_pyfunc_request_is_predicted_or_refused_with_a_4xx(predictor, limits, frame):
    from mlflow.exceptions import MlflowException

    from pipelines.models.pyfunc import predict_records
    from pipelines.models.limits import PredictionGate

    gate = PredictionGate(1, 5.0)
    run_case("request frame: pyfunc (predict_records)", frame.to_dict(orient="list"),
             lambda: _check_records(predict_records(predictor, frame, limits=limits, gate=gate), len(frame)),
             refusals=(MlflowException,), status=lambda e: e.get_http_status_code())


def _b64(value):
    return base64.b64encode(value).decode() if isinstance(value, bytes) else value


@st.composite
def bodies(draw) -> bytes:
    """A ``POST /invocations`` body: MLflow's two layouts with fuzzed cells, other JSON, or bytes."""
    kind = draw(st.sampled_from(("records", "split", "json", "mutated")))
    frame = draw(frames())
    records = [{k: _b64(v) if k == "image" else v for k, v in rec.items()} for rec in frame.to_dict(orient="records")]
    if kind == "records":
        payload = {"dataframe_records": records}
    elif kind == "split":
        columns = list(frame.columns)
        data = [[rec[c] for c in columns] for rec in records]
        if data and draw(st.booleans()):  # a ragged row
            data[0] = data[0][:-1] or [None, None]
        payload = {"dataframe_split": {"columns": columns, "data": data}}
    else:
        payload = draw(_JSON | st.dictionaries(st.sampled_from(["dataframe_records", "dataframe_split", "inputs"]),
                                               _JSON, max_size=2))
    body = json.dumps(payload, allow_nan=True).encode()
    if kind == "mutated" and body:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=3)) + body[cut + 1:]
    return body


def _serve_status(e) -> int:
    """The status ``InstAlignService.invocations`` answers a refusal with."""
    from pipelines.serving.invocation import RequestError

    return e.status if isinstance(e, RequestError) else e.get_http_status_code()


@fuzz_settings()
@given(body=bodies())
def test_ray_serve_body_is_predicted_or_refused_with_a_4xx(predictor, limits, body):
    from mlflow.exceptions import MlflowException

    from pipelines.serving.invocation import RequestError, parse_invocation
    from pipelines.models.pyfunc import predict_records

    # ``max_rows`` as the handler passes it, where parse_invocation counts rows while parsing.
    bounded = "max_rows" in inspect.signature(parse_invocation).parameters
    parse = functools.partial(parse_invocation, max_rows=limits.max_rows) if bounded else parse_invocation

    def call():
        frame = parse(body)
        return _check_records(predict_records(predictor, frame, limits=limits), len(frame))

    run_case("request body: Ray Serve (parse_invocation + predict_records)", body, call,
             refusals=(RequestError, MlflowException), status=_serve_status, uncaught_status=500)


@st.composite
def explain_bodies(draw) -> bytes:
    """A ``POST /explain`` body: ``{"image": base64, "text": ...}`` with fuzzed values, other JSON, or bytes."""
    image = draw(st.sampled_from(GOOD_IMAGES).map(_b64) | _image_bytes().map(_b64) | _JSON)
    payload = draw(st.fixed_dictionaries({"image": st.just(image), "text": _TEXTS}) | _JSON)
    body = json.dumps(payload, allow_nan=True).encode()
    if draw(st.booleans()) and body:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=3)) + body[cut + 1:]
    return body


@fuzz_settings()
@given(body=explain_bodies())
def test_ray_serve_page_body_is_explained_or_refused_with_a_4xx(predictor, limits, body):
    """``POST /explain`` (the page): the work of the handler is ``explain.explain_record``."""
    from mlflow.exceptions import MlflowException

    from pipelines.models.limits import PredictionGate
    from pipelines.serving.explain import explain_record
    from pipelines.serving.invocation import RequestError

    gate = PredictionGate(1, 5.0)

    def call():
        record, png = explain_record(predictor, body, limits=limits, gate=gate)
        json.dumps(record)
        assert png.startswith(b"\x89PNG")
        return record

    run_case("request body: Ray Serve page (explain_record)", body, call,
             refusals=(RequestError, MlflowException), status=_serve_status, uncaught_status=500)


@pytest.mark.skipif(bool(TALLY_PATH), reason="a tally counts cases instead of failing them")
def test_an_uncaught_exception_counts_as_a_traceback_and_a_500():
    """A control: what the Ray Serve handler does not catch fails the property as a 500."""
    from pipelines.serving.invocation import RequestError

    def parse_that_trips():
        raise KeyError("dataframe_split")

    with pytest.raises(AssertionError, match="traceback/5xx .*KeyError"):
        run_case("control", b"{}", parse_that_trips, refusals=(RequestError,), status=_serve_status,
                 uncaught_status=500)


def test_the_fuzzed_requests_reach_the_model(predictor, limits):
    """Not every case is refused: a well-formed request of each layout is predicted."""
    import pandas as pd

    from pipelines.serving.invocation import parse_invocation
    from pipelines.models.pyfunc import predict_records

    frame = pd.DataFrame({"image": [GOOD_IMAGES[0], None], "image_path": [None, "sub/nested.jpg"],
                          "text": GOOD_TEXTS})
    assert len(predict_records(predictor, frame, limits=limits)) == 2
    body = json.dumps({"dataframe_split": {"columns": ["image", "text"],
                                           "data": [[_b64(GOOD_IMAGES[1]), GOOD_TEXTS[0]]]}}).encode()
    assert len(predict_records(predictor, parse_invocation(body), limits=limits)) == 1
    assert not math.isnan(predict_records(predictor, frame, limits=limits)[0]["no_target_prob"])
