"""What ``/invocations`` makes of a request body (``pipelines.serving.invocation``): a DataFrame, or a clean 4xx.

* A body of many tiny records is refused (413) as soon as its rows pass ``max_rows``, before
  they are built: ~650,000 records in 8 MiB took 1.4 s and +156 MiB through ``json.loads``
  and a DataFrame before the pyfunc's row limit refused them.
* Deep nesting, over-long numbers and lone surrogate escapes are clean 400s (they were a
  ``RecursionError``, a ``ValueError`` and pandas' ``UnicodeEncodeError``: HTTP 500).
"""

from __future__ import annotations

import base64
import tracemalloc

import pytest

from pipelines.serving.invocation import RequestError, max_body_bytes, parse_invocation


def test_both_mlflow_layouts_give_the_same_frame_with_image_bytes():
    image = base64.b64encode(b"\x89PNG...").decode()
    records = parse_invocation(('{"dataframe_records": [{"text": "a", "image": "%s"}, {"text": "b"}]}' % image).encode())
    split = parse_invocation(('{"dataframe_split": {"columns": ["text", "image"], "data": [["a", "%s"], ["b", null]]}}'
                              % image).encode())
    for frame in (records, split):
        assert list(frame["text"]) == ["a", "b"] and list(frame["image"]) == [b"\x89PNG...", None]
    assert list(parse_invocation(b'{"dataframe_records": []}').columns) == ["text"]


@pytest.mark.parametrize("body, status, message", [
    (b'[1]', 400, "the body must be a JSON object with 'dataframe_records' or 'dataframe_split'"),
    (b'{"dataframe_records": [], "dataframe_split": {}}', 400, "exactly one of"),
    (b'{"dataframe_records": [1]}', 400, "'dataframe_records' must be a list of objects"),
    (b'{"dataframe_split": {"columns": ["text"]}}', 400, "must be an object with lists 'columns' and 'data'"),
    (b'{"dataframe_split": {"columns": ["text"], "data": [["a"], ["b", "c"]]}}', 400,
     "dataframe_split row 1: expected a list of 1 values"),
    (b'{"dataframe_records": [{"text": "a", "image": 5}]}', 400, "row 0: 'image' must be a base64 string"),
    (b'{"dataframe_records": [{"text": "a"}, {"text": "b", "image": "***"}]}', 400, "row 1: 'image' is not valid base64"),
    (b'{"dataframe_records": [{"text": ', 400, "the body is not valid JSON"),
])
def test_a_bad_body_is_one_clear_refusal_naming_the_row(body, status, message):
    with pytest.raises(RequestError) as info:
        parse_invocation(body)
    assert info.value.status == status and message in info.value.message, info.value.message


def test_the_body_limit_is_the_payload_as_base64_plus_a_mebibyte():
    assert max_body_bytes(3 * 2**20) == 4 * 2**20 + 2**20


def test_many_tiny_records_are_refused_while_they_are_read():
    from pipelines.serving.invocation import RequestError, parse_invocation

    body = b'{"dataframe_records": [' + b",".join([b'{"text":"a"}'] * (8 * 2**20 // 13)) + b"]}"
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as info:
            parse_invocation(body, max_rows=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status == 413
    assert info.value.message == ("the body holds more than 16 rows, the limit per request "
                                  "(INSTALIGN_SERVING_MAX_ROWS); split it")
    assert peak < 3 * len(body), f"reading the body peaked at {peak / 2**20:.0f} MiB"  # the text itself, not the rows
    assert len(parse_invocation(b'{"dataframe_records": [' + b",".join([b'{"text":"a"}'] * 16) + b"]}",
                                max_rows=16)) == 16


@pytest.mark.parametrize("body, needle", [
    (b'{"dataframe_records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 32 levels"),
    (b'{"dataframe_records": [{"text": ' + b"1" * 5000 + b"}]}", "Number too long"),
    (b'{"dataframe_records": [{"text": "the \\ud800 ball"}]}', "Lone surrogate"),
    (b'{"dataframe_split": {"columns": ["text"], "data": [["a"]], "params": ' + b"[0," * 2000 + b"0" + b"]" * 2000
     + b"}}", "nested more than 32 levels"),
    (b'{"dataframe_records": [], "params": [' + b"0," * 5000 + b"0]}", "more than 1088 values"),
])
def test_bodies_that_crashed_the_parser_are_clean_4xx(body, needle):
    from pipelines.serving.invocation import RequestError, parse_invocation

    with pytest.raises(RequestError) as info:
        parse_invocation(body)
    assert 400 <= info.value.status < 500 and needle in info.value.message, info.value.message

