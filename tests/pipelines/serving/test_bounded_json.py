"""``instalign serve``'s request bodies read with bounds (``pipelines.serving.bounded_json``; what ``/invocations`` makes of them is in ``test_invocation.py``).

* Within its bounds, :func:`pipelines.serving.bounded_json.loads` reads what ``json.loads`` reads
  (generated documents, and byte-mutated ones: same value, or both refuse).
"""

from __future__ import annotations

import json
import math

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

