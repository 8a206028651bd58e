"""``instalign serve``'s request bodies read with bounds (``pipelines.serving.bounded_json``, ``pipelines.serving.invocation``).

* Within its bounds, :func:`pipelines.serving.bounded_json.loads` reads what ``json.loads`` reads
  (generated documents, and byte-mutated ones: same value, or both refuse).
* An ``/invocations`` body of many tiny records is refused (413) as soon as its rows pass
  ``max_rows``, before they are built: ~650,000 records in 8 MiB took 1.4 s and +156 MiB
  through ``json.loads`` and a DataFrame before the pyfunc's row limit refused them.
* Deep nesting, over-long numbers and lone surrogate escapes are clean 400s (they were a
  ``RecursionError``, a ``ValueError`` and pandas' ``UnicodeEncodeError``: HTTP 500).
"""

from __future__ import annotations

import json
import math
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz_support import fuzz_settings

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                     max_leaves=20)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _outcome(read, text: str):
    try:
        return "value", read(text)
    except (json.JSONDecodeError, UnicodeEncodeError):
        return "refused", None


@fuzz_settings()
@given(document=_JSON, indent=st.sampled_from([None, 1]), cut=st.integers(0, 200), junk=st.text(max_size=2))
def test_reads_what_json_loads_reads(document, indent, cut, junk):
    from pipelines.serving.bounded_json import loads

    def bounded(text):
        return loads(text, max_rows=10**6, max_values=10**6)

    text = json.dumps(document, indent=indent, ensure_ascii=bool(cut % 2))
    assert _same(bounded(text), json.loads(text))
    mutated = text[:cut] + junk + text[cut + 1:]
    got, want = _outcome(bounded, mutated), _outcome(json.loads, mutated)
    if want[0] == "value" and isinstance(want[1], float) and math.isnan(want[1]):
        assert got[0] == "value" and math.isnan(got[1])
    elif not (want[0] == "value" and got[0] == "refused" and "\\ud" in mutated.lower()):  # lone surrogates: refused
        assert got[0] == want[0] and _same(got[1], want[1]), (mutated, got, want)


def test_the_bounds():
    from pipelines.serving.bounded_json import LimitExceeded, loads

    rows = '{"dataframe_split": {"columns": ["text"], "data": [["a"], ["b"], ["c"]]}, "x": [1, 2, 3, 4]}'
    at = [("dataframe_split", "data")]
    assert loads(rows, rows_at=at, max_rows=3, max_values=100)["dataframe_split"]["data"] == [["a"], ["b"], ["c"]]
    for kwargs, what in (({"max_rows": 2, "max_values": 100}, "rows"), ({"max_rows": 3, "max_values": 12}, "values"),
                         ({"max_rows": 3, "max_values": 100, "max_depth": 2}, "levels of nesting")):
        with pytest.raises(LimitExceeded) as info:
            loads(rows, rows_at=at, **kwargs)
        assert info.value.what == what
    assert loads('{"x": [1, 2, 3, 4]}', rows_at=[("x",)], max_rows=4, max_values=6) == {"x": [1, 2, 3, 4]}
    assert loads('{"y": {"x": [1, 2, 3]}}', rows_at=[("x",)], max_rows=1, max_values=9)  # only at its path


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
