"""The one rule of every replaced output (``pipelines.core.output_dirs``), through the verbs that use it.

``instalign prepare --overwrite`` used to replace any non-empty ``--out``: the release it was
reading (``--root D/raw --out D``), a home directory. Every refusal here happens before Ray
starts, so these tests need no cluster; that a dataset written by an earlier prepare *is*
still replaced is shown on real Ray in ``test_prepare_security.py`` and ``test_prepare.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from pyarrow.fs import LocalFileSystem, _MockFileSystem

from instalign.data.records import MANIFEST_NAME, QUARANTINE_DIR
from pipelines.core.output_dirs import MARKER_NAME, OutputRefused, claim_output, replaceable_output
from pipelines.data.prepare import PrepareError, prepare_dataset
from pipelines.data.output import owns


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _release_inside(tmp: Path, synthetic_root: Path) -> tuple[Path, Path]:
    """``D/raw`` = a release, and ``D`` beside it holds an earlier prepare's marker and manifest."""
    d = tmp / "D"
    shutil.copytree(synthetic_root, d / "raw")
    (d / MARKER_NAME).write_text("")
    (d / MANIFEST_NAME).write_text("{}")
    return d, d / "raw"


def _refused(match: str, **kwargs) -> None:
    with pytest.raises(PrepareError, match=match):
        prepare_dataset(dataset="grefcoco", overwrite=True, progress=False, **kwargs)


def test_prepare_refuses_out_equal_to_or_above_root(synthetic_root, tmp_path):
    d, raw = _release_inside(tmp_path, synthetic_root)
    before = _tree(d)
    _refused(r"is a directory above the input .*raw.*would delete what is being read", root=str(raw), out=str(d))
    _refused(r"output .*raw is the input", root=str(raw), out=str(raw))
    # Above it through a symlink: --out names a link to D, --root a link into it.
    (tmp_path / "link").symlink_to(d)
    _refused("is a directory above the input", root=str(raw), out=str(tmp_path / "link"))
    _refused("is a directory above the input", root=str(tmp_path / "link" / "raw"), out=str(d))
    assert _tree(d) == before


def test_prepare_refuses_a_directory_it_did_not_write(synthetic_root, tmp_path):
    foreign = tmp_path / "x"
    (foreign / "raw").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "photos").mkdir()
    (foreign / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = _tree(foreign)
    for overwrite in (True, False):  # without --overwrite too: the message must not suggest it
        with pytest.raises(PrepareError) as err:
            prepare_dataset(dataset="grefcoco", root=str(synthetic_root), out=str(foreign), overwrite=overwrite)
        assert str(err.value) == (f"output {foreign} is not an empty directory: it holds 3 entries this project did "
                                  f"not write (notes.txt, photos/, raw/) and neither {MANIFEST_NAME} nor "
                                  f"{MARKER_NAME}; refusing to replace it")
    # A user's file put inside an earlier dataset is named, and kept.
    dataset = tmp_path / "ds"
    (dataset / "train").mkdir(parents=True)
    (dataset / "train" / "train-00000.parquet").write_bytes(b"x")
    (dataset / MANIFEST_NAME).write_text("{}")
    (dataset / "train" / "my-notes.txt").write_text("keep")
    (dataset / "raw").mkdir()  # empty, it could be a split's folder before its first shard; not with a file
    (dataset / "raw" / "COCO_1.jpg").write_bytes(b"\xff\xd8")
    _refused(r"holds 2 entries this project did not write \(raw/, train/\); refusing to replace it",
             root=str(synthetic_root), out=str(dataset))
    assert _tree(foreign) == before and (dataset / "train" / "my-notes.txt").read_text() == "keep"


def test_prepare_refuses_a_home_directory(synthetic_root, tmp_path, monkeypatch):
    home = tmp_path / "home" / "me"
    (home / ".ssh").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH")
    (home / MARKER_NAME).write_text("")  # even a home that somehow carries the marker
    monkeypatch.setenv("HOME", str(home))
    _refused(r"is the home directory .*refusing to replace it", root=str(synthetic_root), out=str(home))
    _refused(r"is above the home directory", root=str(synthetic_root), out=str(tmp_path / "home"))
    _refused("^output / is (a directory above the input|above the home directory)", root=str(synthetic_root), out="/")
    assert (home / ".bashrc").read_text() == "export PATH"


def test_replaceable_outputs(tmp_path):
    """What the rule accepts: absent, empty, an interrupted build (marker, shards, no manifest), a dataset."""
    fs = LocalFileSystem()
    assert replaceable_output(fs, str(tmp_path / "new"), owns=owns) is False
    (tmp_path / "empty").mkdir()
    assert replaceable_output(fs, str(tmp_path / "empty"), owns=owns) is False
    run = tmp_path / "interrupted"
    claim_output(fs, str(run))
    assert [p.name for p in run.iterdir()] == [MARKER_NAME]  # the marker is the first file
    (run / "val").mkdir()
    (run / "val" / "val-00003.parquet").write_bytes(b"x")
    (run / "testA").mkdir()  # created before its first shard
    (run / f".{MANIFEST_NAME}.0123abcd.tmp").write_text("{")
    assert replaceable_output(fs, str(run), owns=owns) is True
    done = tmp_path / "done"  # a dataset written before the marker existed: its manifest marks it
    (done / QUARANTINE_DIR).mkdir(parents=True)
    (done / QUARANTINE_DIR / "quarantine.parquet").write_bytes(b"q")
    (done / MANIFEST_NAME).write_text(json.dumps({"files": {}}))
    assert replaceable_output(fs, str(done), owns=owns) is True
    # A shard named for another split, or a file where the output should be, is not ours.
    (run / "val" / "train-00000.parquet").write_bytes(b"x")
    with pytest.raises(OutputRefused, match=r"holds 1 entry this project did not write \(val/\)"):
        replaceable_output(fs, str(run), owns=owns)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="exists and is not a directory"):
        replaceable_output(fs, str(tmp_path / "file"), owns=owns)


def test_the_rule_on_an_object_store():
    """The same calls through pyarrow's filesystem API (its in-memory mock stands in for s3://)."""
    fs = _MockFileSystem()
    claim_output(fs, "bucket/out")
    fs.create_dir("bucket/out/val")
    with fs.open_output_stream("bucket/out/val/val-00000.parquet") as f:
        f.write(b"x")
    assert replaceable_output(fs, "bucket/out", owns=owns, inputs=["/not/compared/to/a/bucket"]) is True
    with fs.open_output_stream("bucket/out/report.pdf") as f:
        f.write(b"x")
    with pytest.raises(OutputRefused, match=r"1 entry this project did not write \(report.pdf\)"):
        replaceable_output(fs, "bucket/out", owns=owns)
    fs.create_dir("bucket/other")
    with fs.open_output_stream("bucket/other/a.txt") as f:
        f.write(b"x")
    with pytest.raises(OutputRefused, match=r"neither .* nor .*refusing"):
        replaceable_output(fs, "bucket/other", owns=owns)


def test_cli_refusal_is_one_line(synthetic_root, tmp_path, capsys):
    from pipelines.cli import main

    d, raw = _release_inside(tmp_path, synthetic_root)
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(raw), "--out", str(d), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "would delete what is being read" in err
    assert (raw / "grefcoco" / "instances.json").is_file() and os.listdir(d)


def test_batch_predict_out_follows_the_same_rule(tmp_path):
    """``instalign predict --data … --out``: new or empty, marked first, never the input or above it."""
    from pipelines.inference.batch import _prepare_out
    from pipelines.inference.tables import BatchPredictError

    data = tmp_path / "tables" / "t.csv"
    data.parent.mkdir()
    data.write_text("image_path,text\na.png,the ball\n")
    with pytest.raises(BatchPredictError, match="is a directory above the input"):
        _prepare_out(str(tmp_path / "tables"), str(data))
    out = tmp_path / "out"
    _prepare_out(str(out), str(data))
    assert [p.name for p in out.iterdir()] == [MARKER_NAME]
    (out / "predictions").mkdir()
    (out / "predictions" / "0_000000.parquet").write_bytes(b"x")
    (out / "summary.json").write_text("{}")
    with pytest.raises(BatchPredictError, match="an earlier run's output.*choose a new one"):
        _prepare_out(str(out), str(data))
    (out / "notes.txt").write_text("keep")
    with pytest.raises(BatchPredictError, match=r"1 entry this project did not write \(notes.txt\)"):
        _prepare_out(str(out), str(data))
    assert data.is_file() and (out / "notes.txt").read_text() == "keep"


def test_bench_data_replaces_only_the_release_it_generated(tmp_path):
    """``instalign bench data --work-dir W`` regenerates ``W/release`` when its size changed: it used
    to ``rmtree`` whatever was there."""
    import argparse

    from pipelines.bench import coco_like, data as bench_data

    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    (tmp_path / "release" / "raw").mkdir(parents=True)
    (tmp_path / "release" / "raw" / "scan.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutputRefused, match=r"holds 1 entry this project did not write \(raw/\)"):
        bench_data.run(parser.parse_args(["--work-dir", str(tmp_path), "--images", "2"]))
    assert (tmp_path / "release" / "raw" / "scan.jpg").is_file()

    generated = tmp_path / "generated"
    coco_like.make_coco_like(generated, num_images=2, instances=4)
    (generated / "totals.json").write_text("{}")
    assert replaceable_output(LocalFileSystem(), str(generated), owns=coco_like.release_owns) is True
