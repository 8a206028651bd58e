"""Where a release's files are and how they are read (``instalign.data.release_files``): located
with a few ``stat`` calls, each missing or unreadable file one error naming it. A real synthetic
release, and files broken as a careless copy would be."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from instalign.data.release_checks import SourceFormatError
from instalign.data.release_files import load_json, load_refs, locate_release, release_checksums


def test_a_release_is_located_and_checksummed_relative_to_its_root(synthetic_root):
    files = locate_release("grefcoco", synthetic_root)
    assert files.refs == synthetic_root / "grefcoco" / "grefs(unc).json"
    assert files.instances == synthetic_root / "grefcoco" / "instances.json"
    assert files.images == synthetic_root / "images" / "train2014"
    sums = release_checksums(files)
    assert sums == {"grefcoco/grefs(unc).json": hashlib.sha256(files.refs.read_bytes()).hexdigest(),
                    "grefcoco/instances.json": hashlib.sha256(files.instances.read_bytes()).hexdigest()}
    assert isinstance(load_refs(files.refs), list) and "images" in load_json(files.instances)


def test_what_is_missing_or_not_a_file_is_named(synthetic_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gRefCOCO refs file not found: .* \(pass refs_file= to point at it\)"):
        locate_release("grefcoco", tmp_path)
    root = tmp_path / "r"
    shutil.copytree(synthetic_root / "grefcoco", root / "grefcoco")
    (root / "grefcoco" / "instances.json").unlink()
    os.mkfifo(root / "grefcoco" / "instances.json")
    with pytest.raises(SourceFormatError, match="instances file .* is not a regular file"):
        locate_release("grefcoco", root)
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        locate_release("coco", root)
    with pytest.raises(ValueError, match=r"refcocog is released split by \('umd', 'google'\), not 'unc'"):
        locate_release("refcocog", root, split_by="unc")


@pytest.mark.parametrize("content, message", [
    (b'{"a": ', r"not valid JSON \(line 1, column 7"),
    (b'["\xc3\x28"]', r"not valid JSON \(not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to be a release file"),
    (b"1" * 5000, r"not valid JSON \(Exceeds the limit"),
])
def test_an_unreadable_json_file_is_one_error_naming_it(tmp_path, content, message):
    path = tmp_path / "refs.json"
    path.write_bytes(content)
    with pytest.raises(SourceFormatError, match=rf"^{tmp_path}/refs.json: {message}"):
        load_refs(path)
