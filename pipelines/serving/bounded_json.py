"""JSON read with bounds on what it builds: rows, values and nesting (``instalign serve``'s bodies).

``json.loads`` builds the whole document before anyone can look at it: an 8 MiB body of tiny
records is ~650,000 dicts (+156 MiB, 1.4 s measured) before a limit of 16 rows can refuse it,
and deep nesting ends in ``RecursionError``. :func:`loads` reads the same JSON — strings and
numbers with the standard library's own scanners (C where available), the objects and arrays
walked here — and stops as soon as a bound is passed:

* ``max_rows`` elements in an array at one of ``rows_at`` (key paths from the top, e.g.
  ``("dataframe_split", "data")``), counted as each element starts;
* ``max_values`` JSON values in the whole document (a guard on everything outside the rows);
* ``max_depth`` levels of nesting.

A document that is not JSON raises ``json.JSONDecodeError`` as ``json.loads`` would; so does
a string holding a lone surrogate escape (``"\\ud800"``), which ``json.loads`` lets through
but no UTF-8 text can hold (pandas' string columns raise on it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from json.decoder import scanstring  # the C scanner where the interpreter has it
from json.scanner import NUMBER_RE
from typing import Any

_WS = re.compile(r"[ \t\n\r]*")
_LITERALS = (("null", None), ("true", True), ("false", False), ("NaN", float("nan")),
             ("Infinity", float("inf")), ("-Infinity", float("-inf")))


class LimitExceeded(ValueError):
    """The document passes a bound: ``what`` is ``"rows"``, ``"values"`` or ``"depth"``."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"more than {limit} {what}")
        self.what, self.limit = what, limit


def loads(text: str, *, rows_at: Collection[tuple[str, ...]] = (), max_rows: int,
          max_values: int, max_depth: int = 32) -> Any:
    """``json.loads(text)``, refused with :class:`LimitExceeded` as soon as a bound is passed."""
    return _Reader(text, frozenset(rows_at), max_rows, max_values, max_depth).document()


class _Reader:
    def __init__(self, text: str, rows_at: frozenset, max_rows: int, max_values: int, max_depth: int) -> None:
        self.text, self.rows_at = text, rows_at
        self.max_rows, self.max_values, self.max_depth = max_rows, max_values, max_depth
        self.values = 0

    def document(self) -> Any:
        value, end = self.value(self._skip(0), 0, ())
        end = self._skip(end)
        if end != len(self.text):
            raise json.JSONDecodeError("Extra data", self.text, end)
        return value

    def _skip(self, idx: int) -> int:
        return _WS.match(self.text, idx).end()

    def _expect(self, idx: int, char: str, what: str) -> int:
        if self.text[idx:idx + 1] != char:
            raise json.JSONDecodeError(f"Expecting {what}", self.text, idx)
        return idx + 1

    def value(self, idx: int, depth: int, path: tuple) -> tuple[Any, int]:
        self.values += 1
        if self.values > self.max_values:
            raise LimitExceeded("values", self.max_values)
        text, char = self.text, self.text[idx:idx + 1]
        if char in ("{", "["):
            if depth >= self.max_depth:
                raise LimitExceeded("levels of nesting", self.max_depth)
            return (self.object if char == "{" else self.array)(idx + 1, depth + 1, path)
        if char == '"':
            return self.string(idx)
        for word, literal in _LITERALS:
            if text.startswith(word, idx):
                return literal, idx + len(word)
        match = NUMBER_RE.match(text, idx)
        if match is None:
            raise json.JSONDecodeError("Expecting value", text, idx)
        integer, frac, exp = match.groups()
        try:
            number = float(integer + (frac or "") + (exp or "")) if frac or exp else int(integer)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise json.JSONDecodeError("Number too long", text, idx) from None
        return number, match.end()

    def string(self, idx: int) -> tuple[str, int]:
        """The string whose opening quote is at ``idx``, refused if it is not valid Unicode."""
        value, end = scanstring(self.text, idx + 1)
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise json.JSONDecodeError(f"Lone surrogate in a string (its character {e.start})", self.text,
                                           idx) from None
        return value, end

    def object(self, idx: int, depth: int, path: tuple) -> tuple[dict, int]:
        out: dict[str, Any] = {}
        idx = self._skip(idx)
        if self.text[idx:idx + 1] == "}":
            return out, idx + 1
        while True:
            self._expect(idx, '"', "property name enclosed in double quotes")
            key, idx = self.string(idx)
            idx = self._skip(self._expect(self._skip(idx), ":", "':' delimiter"))
            out[key], idx = self.value(idx, depth, path + (key,))
            idx = self._skip(idx)
            if self.text[idx:idx + 1] == "}":
                return out, idx + 1
            idx = self._skip(self._expect(idx, ",", "',' delimiter"))

    def array(self, idx: int, depth: int, path: tuple) -> tuple[list, int]:
        out: list[Any] = []
        rows = path in self.rows_at
        idx = self._skip(idx)
        if self.text[idx:idx + 1] == "]":
            return out, idx + 1
        while True:
            if rows and len(out) >= self.max_rows:
                raise LimitExceeded("rows", self.max_rows)
            item, idx = self.value(idx, depth, ("[]",))  # inside an array no key path continues
            out.append(item)
            idx = self._skip(idx)
            if self.text[idx:idx + 1] == "]":
                return out, idx + 1
            idx = self._skip(self._expect(idx, ",", "',' delimiter"))
