"""Where ``instalign prepare`` builds a dataset and how it replaces an old one (``pipelines.data.output``).

Real local directories and pyarrow's in-memory filesystem (an object store: no rename). The
refusals of the shared ``--out`` rule are in ``tests/pipelines/core/test_output_dirs.py``.
"""

from __future__ import annotations

import json

import pytest
from pyarrow.fs import FileSelector, FileType, LocalFileSystem, _MockFileSystem

from instalign.data.records import MANIFEST_NAME
from pipelines.core.output_dirs import MARKER_NAME
from pipelines.data.output import check_output, owns, replace_output, resolve_output, sibling_path, write_manifest
from pipelines.data.records import PrepareError


def test_owns_only_a_datasets_files():
    for rel in (MANIFEST_NAME, MARKER_NAME, "_quarantine/", "_quarantine/quarantine.parquet", "train/",
                "train/train-00003.parquet", f".{MANIFEST_NAME}.0a1b.tmp"):
        assert owns(rel), rel
    for rel in ("notes.txt", "train/other-00003.parquet", "train/train-3.parquet", "../train/", "photos/a.jpg"):
        assert not owns(rel), rel


def test_resolve_output_makes_a_local_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve_output("out")
    assert fs.type_name == "local" and path == str(tmp_path / "out")
    fs, path = resolve_output((tmp_path / "x").as_uri())
    assert fs.type_name == "local" and path == str(tmp_path / "x")


def test_an_existing_dataset_is_replaced_only_with_overwrite(tmp_path):
    fs, out = LocalFileSystem(), tmp_path / "out"
    assert check_output(fs, str(out), overwrite=False) is False  # nothing there
    out.mkdir()
    (out / MARKER_NAME).write_text("")
    (out / "train").mkdir()
    (out / "train" / "train-00000.parquet").write_bytes(b"x")
    with pytest.raises(PrepareError, match=r"already holds \d+ file\(s\) from an earlier .* pass --overwrite"):
        check_output(fs, str(out), overwrite=False)
    write_manifest(fs, str(out), {"splits": {}})
    with pytest.raises(PrepareError, match=r"already holds a finished dataset \(_manifest.json\)"):
        check_output(fs, str(out), overwrite=False)
    assert check_output(fs, str(out), overwrite=True) is True


def test_write_manifest_leaves_only_the_manifest(tmp_path):
    write_manifest(LocalFileSystem(), str(tmp_path), {"splits": {"val": 3}})
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == {"splits": {"val": 3}}


def test_a_local_replacement_swaps_the_new_dataset_in_and_deletes_the_old(tmp_path):
    fs = LocalFileSystem()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    built = sibling_path(str(tmp_path / "out"), "building")
    assert built.startswith(f"{tmp_path}/.out.building-")
    fs.create_dir(built)
    write_manifest(fs, built, {"new": True})
    replace_output(fs, built, str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no sibling left behind
    assert [p.name for p in (tmp_path / "out").iterdir()] == [MANIFEST_NAME]


def test_an_object_store_replacement_deletes_the_old_prefix_and_copies_the_new_one_in():
    fs = _MockFileSystem()
    for path in ("bucket/out/old.parquet", "bucket/.new/train/train-00000.parquet", f"bucket/.new/{MANIFEST_NAME}"):
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(b"x")
    replace_output(fs, "bucket/.new", "bucket/out")
    files = sorted(i.path for i in fs.get_file_info(FileSelector("bucket", recursive=True)) if i.type == FileType.File)
    assert files == [f"bucket/out/{MANIFEST_NAME}", "bucket/out/train/train-00000.parquet"]


def test_sibling_path_needs_a_parent():
    with pytest.raises(PrepareError, match="has no parent"):
        sibling_path("out", "building")
