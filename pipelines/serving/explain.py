"""The page's ``POST /explain``: one image and one expression → the record and its overlay.

The page (``pipelines/serving/web``) shows what ``instalign predict --out`` draws
(``instalign.visualize.overlay``), so the work is the pyfunc's checks, one prediction and
the overlay. :func:`explain_record` runs in a request thread of the replica; everything in it
that grows with the image runs inside one slot of the serving gate.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd

from instalign.visualize import PALETTE, overlay
from pipelines.models.pyfunc import check_request, decode_image, predict_checked
from pipelines.models.records import record_to_prediction
from pipelines.serving.invocation import RequestError, b64decode_image, read_json

__all__ = ["explain_record", "overlay_colours"]


def explain_record(predictor, body: bytes, *, limits, gate) -> tuple[dict[str, Any], bytes]:
    """The work of ``POST /explain`` (``{"image": base64, "text": str}``), in a request thread:
    the record and its overlay PNG.

    The body is read with bounds and checked as the pyfunc checks a request, with no model
    work; then, inside one of ``gate``'s slots, everything that grows with the image — the
    prediction, the image decoded again and the overlay drawn at its full size — so the
    gate bounds the page's memory as it bounds ``/invocations``'.
    """
    payload = read_json(body, max_rows=1)
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object with 'image' and 'text'")
    image = b64decode_image(0, payload.get("image"))
    if not image:
        raise RequestError(400, "choose an image first")
    request = check_request(pd.DataFrame({"image": [image], "text": [payload.get("text")]}), limits)
    with gate.slot():
        (record,) = predict_checked(predictor, request)
        return record, _overlay_png(image, record, request.texts[0])


def overlay_colours(instances: int) -> list[str]:
    """The ``#rrggbb`` colours the overlay gave each instance, in order, for the page's legend."""
    return ["#%02x%02x%02x" % PALETTE[k % len(PALETTE)] for k in range(instances)]


def _overlay_png(image: bytes, record: dict[str, Any], text: str) -> bytes:
    """``instalign.visualize.overlay`` of a served record, as PNG bytes."""
    picture = decode_image("image", image)
    buf = io.BytesIO()
    overlay(picture, record_to_prediction(record), text, top_words=2).save(buf, format="PNG")
    return buf.getvalue()
