"""``prepare`` against a hostile release and a careless re-run (issue 11), on real Ray Data.

One prepare over a release that tries every path trick at once (a split named
``../../escaped``, absolute and ``..`` image names, a link to ``/dev/zero``, a FIFO, a
decompression bomb, a secret in the command line and in the root's name), and the
``--overwrite`` runs that must never lose the old dataset. Ray runs are few on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instalign.data.records import MANIFEST_NAME, QUARANTINE_DIR
from instalign.data.synthetic import generate_grefcoco
from pipelines.data import prepare as prep
from pipelines.core.output_dirs import MARKER_NAME
from pipelines.data.prepare import prepare_dataset
from tests.support.hostile_images import png_header_only


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _hostile_release(tmp: Path) -> dict:
    """A synthetic release under a root whose *name* carries a token, sabotaged image by image."""
    root = tmp / "src?token=hunter3"
    generate_grefcoco(root, num_images=10, seed=5)
    gdir, idir = root / "grefcoco", root / "images" / "train2014"
    inst = json.loads((gdir / "instances.json").read_text())
    refs = json.loads((gdir / "grefs(unc).json").read_text())
    with_samples = sorted({r["image_id"] for r in refs if r["sentences"]})
    info = {i["id"]: i for i in inst["images"]}
    name = {i: info[i]["file_name"] for i in with_samples}
    img = with_samples
    outside = tmp / "outside"
    outside.mkdir()

    shutil.copy(idir / name[img[0]], outside / "abs.jpg")  # a real, readable image: only the path is wrong
    info[img[0]]["file_name"] = str(outside / "abs.jpg")  # absolute → path_escape
    shutil.copy(idir / name[img[1]], outside / "up.jpg")
    info[img[1]]["file_name"] = "../../../outside/up.jpg"  # climbs out of root → path_escape
    (idir / name[img[2]]).unlink()
    (idir / name[img[2]]).symlink_to("/dev/zero")  # → not_regular_file (would read forever)
    (idir / name[img[3]]).unlink()
    os.mkfifo(idir / name[img[3]])  # → not_regular_file (would wait forever for a writer)
    (idir / name[img[4]]).write_bytes(png_header_only(30000, 30000))  # 900 M pixels → image_too_large
    (idir / "sub").mkdir()
    (idir / "sub" / name[img[5]]).write_bytes((idir / name[img[5]]).read_bytes())
    info[img[5]]["file_name"] = f"sub/../sub/{name[img[5]]}"  # '..' that stays inside: fine
    info[img[7]]["file_name"] = "COCO\0.jpg"  # → invalid_file_name (os.stat raised ValueError: run failed)
    info[img[8]]["file_name"] = "COCO_\ud800.jpg"  # a lone surrogate: valid JSON, no UTF-8 → invalid_file_name
    victim = next(r for r in refs if r["image_id"] == img[6] and r["sentences"])
    victim["split"] = "../../escaped"  # → unsafe_split, and never a directory
    (gdir / "instances.json").write_text(json.dumps(inst))
    (gdir / "grefs(unc).json").write_text(json.dumps(refs))
    return dict(root=root, images=img, victim=victim)


@pytest.mark.timeout(900)  # before the fix the FIFO hung prepare forever
def test_hostile_release_is_quarantined_and_writes_only_under_out(ray_local, tmp_path, monkeypatch):
    release = _hostile_release(tmp_path)
    img = release["images"]
    out = tmp_path / "deep" / "er" / "out"
    monkeypatch.setattr(sys, "argv", ["instalign", "prepare", "--out", "s3://AKIAEXAMPLE:hunter2@bucket/data",
                                      "--token", "tok-123"])
    manifest = prepare_dataset(dataset="grefcoco", root=str(release["root"]), out=str(out), rows_per_shard=4,
                               progress=False)

    assert manifest["quarantined"] == {"invalid_file_name": 2, "path_escape": 2, "not_regular_file": 2,
                                       "image_too_large": 1, "unsafe_split": 1}
    q = pq.read_table(out / QUARANTINE_DIR / "quarantine.parquet").to_pylist()
    by_image = {r["image_id"]: r for r in q}
    assert by_image[img[0]]["reason"] == by_image[img[1]]["reason"] == "path_escape"
    assert "outside --root" in by_image[img[0]]["detail"]
    assert "character device" in by_image[img[2]]["detail"] and "FIFO" in by_image[img[3]]["detail"]
    assert "too large" in by_image[img[4]]["detail"]
    assert by_image[img[7]]["reason"] == by_image[img[8]]["reason"] == "invalid_file_name"
    assert "cannot name a file: it holds a NUL byte" in by_image[img[7]]["detail"]  # (the path is redacted here)
    assert "cannot be encoded" in by_image[img[8]]["detail"]
    unsafe = next(r for r in q if r["reason"] == "unsafe_split")
    assert unsafe["ref_id"] == release["victim"]["ref_id"] and "'../../escaped'" in unsafe["detail"]

    # Nothing escaped: every file is under out, and out holds only split folders, quarantine, manifest.
    assert not (tmp_path / "deep" / "escaped").exists()  # where out/../../escaped would have gone
    assert all(out in p.parents for p in (tmp_path / "deep").rglob("*") if not p.is_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["deep", "outside", release["root"].name])
    assert {p.name for p in out.iterdir()} <= {"train", "val", "testA", "testB", QUARANTINE_DIR, MANIFEST_NAME,
                                              MARKER_NAME}
    stored = {r["image_id"] for s in manifest["files"] for n in manifest["files"][s]
              for r in pq.read_table(out / s / n, columns=["image_id"]).to_pylist()}
    assert stored.isdisjoint(img[:5] + img[7:9]) and img[5] in stored  # the '..' that stays inside is read
    assert img[9] in stored  # the rest of the release is prepared
    assert release["victim"]["sentences"][0]["raw"] not in json.dumps(manifest)

    # Redacted: the command line's credentials and the token in the root's name.
    text = (out / MANIFEST_NAME).read_text()
    for secret in ("hunter2", "hunter3", "tok-123", "AKIAEXAMPLE"):
        assert secret not in text
        assert not any(secret in r["detail"] for r in q)
    assert "--token '***'" in manifest["command"] or "--token ***" in manifest["command"]
    assert manifest["source"]["root"].endswith("src?token=***")


def _broken_copy(synthetic_root: Path, tmp: Path) -> Path:
    """``synthetic_root`` with one truncated val image: only a Ray worker can see it."""
    root = tmp / "broken"
    shutil.copytree(synthetic_root, root)
    val = {r["image_id"] for r in json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
           if r["split"] == "val" and r["sentences"]}
    names = {i["id"]: i["file_name"] for i in json.loads((root / "grefcoco" / "instances.json").read_text())["images"]}
    victim = root / "images" / "train2014" / names[min(val)]
    victim.write_bytes(victim.read_bytes()[:300])
    return root


def test_failing_overwrite_leaves_the_old_dataset_intact(ray_local, prepared_dataset, synthetic_root, tmp_path,
                                                         capsys, monkeypatch):
    from pipelines.cli import main

    out = tmp_path / "data" / "grefcoco"
    shutil.copytree(prepared_dataset, out)
    before = _tree(out)
    broken = _broken_copy(synthetic_root, tmp_path)

    # --strict --overwrite with a bad source: fails after processing (a worker finds the image).
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(broken), "--out", str(out), "--strict",
               "--overwrite", "--splits", "val", "--no-progress"])
    err = capsys.readouterr().err  # progress log lines, then the error
    assert rc == 1 and "\ninstalign prepare: --strict: 1 bad record" in err and "Traceback" not in err
    assert _tree(out) == before
    assert os.listdir(out.parent) == ["grefcoco"]  # the temporary sibling is gone too

    # Killed just before the manifest: same.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the manifest")

    monkeypatch.setattr(prep, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(out), splits=["val"], overwrite=True,
                        progress=False)
    monkeypatch.undo()
    assert _tree(out) == before and os.listdir(out.parent) == ["grefcoco"]

    # A good overwrite replaces it whole: only val now, no file of the old train split left.
    manifest = prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(out), splits=["val"],
                               overwrite=True, progress=False)
    assert list(manifest["counts"]) == ["val"] and not (out / "train").exists()
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert os.listdir(out.parent) == ["grefcoco"]


def test_replace_output_on_an_object_store_writes_the_manifest_last():
    """No rename on object stores: delete the old prefix, copy the new one in, manifest last
    (pyarrow's in-memory mock filesystem, whose ``type_name`` is not ``local``)."""
    from pyarrow.fs import FileSelector, FileType, _MockFileSystem

    fs = _MockFileSystem()
    assert fs.type_name != "local"
    for path, text in {"b/out/train/train-00000.parquet": "old", "b/out/_manifest.json": "{}",
                       "b/new/val/val-00000.parquet": "new", "b/new/_quarantine/quarantine.parquet": "q",
                       "b/new/_manifest.json": '{"new": 1}'}.items():
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    copied = []
    copy_file = fs.copy_file

    class Spy:
        type_name = fs.type_name

        def __getattr__(self, name):
            return getattr(fs, name)

        def copy_file(self, src, dst):
            copied.append(dst)
            copy_file(src, dst)

    prep.replace_output(Spy(), "b/new", "b/out")
    files = sorted(i.path for i in fs.get_file_info(FileSelector("b", recursive=True)) if i.type == FileType.File)
    assert files == ["b/out/_manifest.json", "b/out/_quarantine/quarantine.parquet", "b/out/val/val-00000.parquet"]
    assert copied[-1] == "b/out/_manifest.json"
    with fs.open_input_stream("b/out/_manifest.json") as f:
        assert f.read() == b'{"new": 1}'


def test_strict_with_an_unsafe_split_fails_on_the_driver(synthetic_root, tmp_path, monkeypatch):
    """Refused while planning (Ray starts meanwhile, issue 16): no task ever sees the release."""
    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    path = root / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    refs[0]["split"] = "/tmp/abs"
    path.write_text(json.dumps(refs))

    def no_pass(*args, **kwargs):
        raise AssertionError("no Ray Data task may run for a release refused on the driver")

    monkeypatch.setattr(prep, "init_ray", lambda address=None, **options: None)  # no cluster needed here
    monkeypatch.setattr(prep, "_run_pass", no_pass)
    with pytest.raises(prep.PrepareError, match=r"\[unsafe_split\] ref 0: split '/tmp/abs' is not a safe"):
        prepare_dataset(dataset="grefcoco", root=root, out=str(tmp_path / "out"), strict=True)
    with pytest.raises(prep.PrepareError, match=r"split name '\.\./x' is not a safe directory name"):
        prepare_dataset(dataset="grefcoco", root=root, out=str(tmp_path / "out"), splits=["../x"])
    assert not (tmp_path / "out").exists()

