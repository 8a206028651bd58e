"""The checks a release's records go through (``instalign.data.release_checks``): split and file
names that can name a directory or file, typed record fields, bounded messages and depths."""

from __future__ import annotations

from pathlib import Path

import pytest

from instalign.data.release_checks import (
    Record,
    SourceFormatError,
    brief,
    file_name_problem,
    is_int_or_int_list,
    is_safe_split_name,
    nesting_depth,
)


def test_split_names_are_one_safe_directory_level():
    for ok in ("train", "val", "testA", "test_b", "v1.2-x", "a" * 64):
        assert is_safe_split_name(ok), ok
    for bad in ("", ".", "..", ".hidden", "a/b", "/tmp", "a" * 65, "a b", "é", 3, None):
        assert not is_safe_split_name(bad), bad


def test_a_file_name_that_cannot_name_a_file_says_why():
    assert file_name_problem("images/a.jpg") is None
    assert file_name_problem("a\0b.jpg") == "it holds a NUL byte"
    assert file_name_problem("a\ud800.jpg").startswith("its character '\\ud800' cannot be encoded")


def test_a_record_names_its_file_and_place_in_every_error():
    record = Record(Path("refs.json"), "ref #3", {"id": 5, "big": 2**70, "text": 7, "ids": [1, True]})
    assert record.integer("id") == 5 and record.integer("missing", default=None) is None
    with pytest.raises(SourceFormatError, match=r"^refs.json: ref #3: key 'big' holds 1180591620717411303424, "
                                                 r"outside the signed 64-bit range"):
        record.integer("big")
    with pytest.raises(SourceFormatError, match=r"^refs.json: ref #3: key 'text' must be a string, got int 7$"):
        record.string("text")
    with pytest.raises(SourceFormatError, match="missing key 'nope'"):
        record.string("nope")
    with pytest.raises(SourceFormatError, match=r"^refs.json: ref #4 must be an object/dict, got list$"):
        Record(Path("refs.json"), "ref #4", [])
    assert not is_int_or_int_list(record.raw["ids"]) and is_int_or_int_list([1, 2]) and is_int_or_int_list(3)


def test_brief_and_depth_stay_bounded_on_hostile_nesting():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert len(brief(deep)) < 100 and len(brief("x" * 10_000)) < 100
    assert nesting_depth(deep, 32) == 32
    assert nesting_depth([[1.0, 2.0], [3.0]], 32) == 1 and nesting_depth(5, 32) == 0
