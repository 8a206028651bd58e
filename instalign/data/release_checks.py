"""Checks of one record of a release file, and of the names ``prepare`` must not trust.

The readers (``instalign.data.readers``) read every ref, image and annotation through a
:class:`Record`: a key missing, of the wrong type, or an int outside the Parquet column it
is stored in ends in a :class:`SourceFormatError` naming the file, the record and the
problem — never a bare ``KeyError``, ``RecursionError`` or ``OverflowError``. Values are
shown by :func:`brief`, bounded in length and depth, since a hostile pickle can carry a
list nested 100,000 deep.

What the readers keep but ``prepare`` quarantines is judged here too, so both use one rule:
split names that are not safe directory names (:func:`is_safe_split_name`) and image file
names that cannot name a file at all (:func:`file_name_problem`).
"""

from __future__ import annotations

import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable

from instalign.errors import InstAlignError

__all__ = ["SourceFormatError", "Record", "brief", "is_int", "is_text_or_none", "is_int_or_int_list", "as_list",
           "nesting_depth", "INT_RANGE", "is_safe_split_name", "file_name_problem"]

#: Split names become directory names under ``prepare --out``: one path component, no leading
#: dot (so never ``.``/``..`` or hidden), no separator, at most 64 characters.
_SAFE_SPLIT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}\Z")
#: Signed ranges of the Arrow columns the ints end up in (``instalign.data.records``).
INT_RANGE = {64: (-(1 << 63), (1 << 63) - 1), 32: (-(1 << 31), (1 << 31) - 1)}

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 2, 60, 60, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 6

_SCALARS = frozenset((int, float, str, bool, bytes, type(None)))
_INT_ONLY = frozenset((int,))


class SourceFormatError(InstAlignError, ValueError):
    """A release file is malformed; the message names the file, the record and the problem."""


def brief(value: Any) -> str:
    """A short repr of a value from a release file, for messages: bounded in length and depth
    (a plain ``repr`` of a list nested 100 000 deep, which a pickle can carry, recurses out)."""
    return _BRIEF.repr(value)


def is_safe_split_name(name: object) -> bool:
    """Whether ``name`` can be a split directory: ``[A-Za-z0-9_][A-Za-z0-9_.-]*``, ≤ 64 chars."""
    return isinstance(name, str) and _SAFE_SPLIT.match(name) is not None


def file_name_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file at all (``None`` when it can), for ``prepare`` to quarantine.

    A NUL byte (``os.stat`` raises ``ValueError``), or a character that neither UTF-8 (the
    Parquet string columns) nor the filesystem encoding can represent — a lone surrogate from
    a JSON ``"\\ud800"`` escape — would otherwise fail the whole run instead of one image.
    """
    if "\0" in path:
        return "it holds a NUL byte"
    for encode in (lambda p: p.encode("utf-8"), os.fsencode):
        try:
            encode(path)
        except UnicodeEncodeError as e:
            return f"its character {path[e.start]!r} cannot be encoded ({e.encoding}: {e.reason})"
    return None


class Record:
    """Typed access to one JSON/pickle record; every error names file and record."""

    def __init__(self, path: Path, where: str, raw: Any):
        if not isinstance(raw, dict):
            raise SourceFormatError(f"{path}: {where} must be an object/dict, got {type(raw).__name__}")
        self.path, self.where, self.raw = path, where, raw

    def fail(self, msg: str) -> SourceFormatError:
        return SourceFormatError(f"{self.path}: {self.where}: {msg}")

    def get(self, key: str, check: Callable[[Any], bool], expected: str, *, default: Any = ...) -> Any:
        if key not in self.raw:
            if default is not ...:
                return default
            raise self.fail(f"missing key '{key}'")
        value = self.raw[key]
        if not check(value):
            raise self.fail(f"key '{key}' must be {expected}, got {type(value).__name__} {brief(value)}")
        return value

    def integer(self, key: str, *, bits: int = 64, **kw: Any) -> int:
        """An int that fits the ``bits``-bit signed column it is stored in."""
        value = self.raw.get(key)
        if type(value) is int:  # the common case, inline: a release holds millions of these
            lo, hi = INT_RANGE[bits]
            if lo <= value <= hi:
                return value
        return self.in_range(key, self.get(key, is_int, "an int", **kw), bits)

    def in_range(self, key: str, value: Any, bits: int = 64) -> Any:
        """``value`` (an int, a list of ints or None) after checking every int fits ``bits`` bits."""
        lo, hi = INT_RANGE[bits]
        values = () if value is None else as_list(value)
        if values and lo <= min(values) and max(values) <= hi:
            return value
        for v in values:
            if not lo <= v <= hi:
                shown = v if v.bit_length() <= 256 else f"an int of {v.bit_length()} bits"
                raise self.fail(f"key '{key}' holds {shown}, outside the signed {bits}-bit range it is stored in")
        return value

    def string(self, key: str, **kw: Any) -> str:
        return self.get(key, lambda v: isinstance(v, str), "a string", **kw)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_text_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


def is_int_or_int_list(v: Any) -> bool:
    if type(v) is list and _INT_ONLY.issuperset(map(type, v)):  # JSON's case, in C (bool is not int here)
        return True
    return is_int(v) or (isinstance(v, (list, tuple)) and all(is_int(x) for x in v))


def as_list(v: int | list[int]) -> list[int]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of lists/tuples/dicts in ``value``, counted iteratively and at most ``limit``."""
    if not isinstance(value, (list, tuple, dict)):
        return 0
    depth, level = 0, [value]
    while depth < limit:
        nested = []
        for v in level:
            children = v.values() if isinstance(v, dict) else v
            if not _SCALARS.issuperset(map(type, children)):  # a polygon's floats are passed over in C
                nested += [c for c in children if isinstance(c, (list, tuple, dict))]
        if not nested:
            return depth
        level = nested
        depth += 1
    return depth
