"""The body of ``POST /invocations``: MLflow's scoring protocol, parsed and bounded (``instalign serve``).

A client written against ``mlflow models serve`` sends ``{"dataframe_records": [...]}`` or
``{"dataframe_split": {"columns": [...], "data": [...]}}`` with ``image`` as base64 of the
encoded bytes; :func:`parse_invocation` turns it into the DataFrame the pyfunc predicts
(``pipelines.models.pyfunc.predict_records``). What is refused here — a body that is not such JSON,
bad base64 — is a :class:`RequestError` (400), before any of the pyfunc's own checks; and
the raw body is read no further than :func:`max_body_bytes`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import pandas as pd

from instalign.errors import InstAlignError
from pipelines.serving.bounded_json import LimitExceeded, loads


class RequestError(InstAlignError):
    """A request refused at the HTTP layer (before the pyfunc's checks): status and message."""

    def __init__(self, status: int, message: str, error_code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def max_body_bytes(max_request_bytes: int) -> int:
    """The largest HTTP body worth reading: the payload limit as base64 (4/3) plus 1 MiB of JSON."""
    return 4 * math.ceil(max_request_bytes / 3) + 2**20


#: Where the rows are in MLflow's two layouts (key paths from the top of the body).
ROWS_AT = (("dataframe_records",), ("dataframe_split", "data"))


def read_json(body: bytes, *, max_rows: int):
    """The JSON of a request body, read with bounds (``pipelines.serving.bounded_json``): refused (413)
    as soon as its rows (:data:`ROWS_AT`) pass ``max_rows`` or it holds more than 64 values per
    row allowed (a guard on what lies outside the rows), 400 past 32 levels of nesting or when
    it is not JSON — nothing over a bound is built first."""
    try:
        return loads(body.decode(json.detect_encoding(body), "surrogatepass"), rows_at=ROWS_AT, max_rows=max_rows,
                     max_values=64 * (max_rows + 1))
    except LimitExceeded as e:
        if e.what == "levels of nesting":
            raise RequestError(400, f"the body is nested more than {e.limit} levels deep") from None
        why = ("the limit per request (INSTALIGN_SERVING_MAX_ROWS); split it" if e.what == "rows"
               else f"64 per row of the {max_rows} allowed (INSTALIGN_SERVING_MAX_ROWS)")
        raise RequestError(413, f"the body holds more than {e.limit} {e.what}, {why}", "RESOURCE_EXHAUSTED") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None


def parse_invocation(body: bytes, *, max_rows: int = 16):
    """The JSON body of ``/invocations`` → a DataFrame (``image`` base64-decoded to bytes).

    Accepts MLflow's ``dataframe_records`` and ``dataframe_split`` (``columns`` + ``data``),
    with at most ``max_rows`` rows, counted while the body is read (:func:`read_json`).
    """
    payload = read_json(body, max_rows=max_rows)
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object with 'dataframe_records' or 'dataframe_split'")
    keys = [k for k in ("dataframe_records", "dataframe_split") if k in payload]
    if len(keys) != 1:
        raise RequestError(400, f"the body needs exactly one of 'dataframe_records' or 'dataframe_split' "
                                f"(got keys {sorted(payload)})")
    if keys[0] == "dataframe_records":
        records = payload["dataframe_records"]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise RequestError(400, "'dataframe_records' must be a list of objects")
        frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=["text"])
    else:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) \
                or not isinstance(split.get("data"), list):
            raise RequestError(400, "'dataframe_split' must be an object with lists 'columns' and 'data'")
        columns = split["columns"]
        for row, values in enumerate(split["data"]):
            if not isinstance(values, list) or len(values) != len(columns):
                raise RequestError(400, f"dataframe_split row {row}: expected a list of {len(columns)} values")
        frame = pd.DataFrame(split["data"], columns=columns)
    if "image" in frame.columns:
        frame["image"] = [b64decode_image(row, value) for row, value in enumerate(frame["image"])]
    return frame


def b64decode_image(row: int, value: Any) -> Any:
    """Row ``row``'s base64 ``image`` field → bytes (``None`` stays missing); a 400 otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"row {row}: 'image' must be a base64 string of the encoded image, "
                                f"got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"row {row}: 'image' is not valid base64") from None
