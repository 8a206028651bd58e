"""``prepare`` on Ray Data, end to end on synthetic gRefCOCO files (real Ray, real files).

Ray pipelines are few on purpose (each costs seconds on 2 cores): the shared
``prepared_dataset``, one run over a dataset with every kind of bad record, one strict run
and one interrupted run (plus its ``--overwrite`` re-run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest

from instalign.data.masks import rle_decode, resize_mask_nearest
from instalign.data.records import IMAGE_SCHEMA, MANIFEST_NAME, QUARANTINE_DIR, QUARANTINE_SCHEMA
from instalign.data.synthetic import generate_grefcoco
from pipelines.data import prepare as prep
from pipelines.data.prepare import PrepareError, prepare_dataset
from pipelines.data.records import manifest_source_info

REPO = Path(__file__).resolve().parents[3]


def _oracle_mask(segmentation, h: int, w: int) -> np.ndarray:
    """Rasterise a COCO segmentation with pycocotools directly (independent of instalign.data.masks)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def _rows(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    rows = []
    for name in manifest["files"][split]:
        rows += pq.read_table(out / split / name).to_pylist()
    return rows


def test_manifest_counts_equal_generator(prepared_dataset, tmp_path):
    expected = generate_grefcoco(tmp_path / "again", num_images=24, seed=0)  # deterministic: same counts
    manifest = json.loads((prepared_dataset / MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == 1 and manifest["dataset"] == "grefcoco"
    assert set(manifest["counts"]) == {"train", "val", "testA", "testB"}
    for split, counts in manifest["counts"].items():
        for key in ("images", "refs", "samples", "no_target_samples", "multi_target_samples"):
            assert counts[key] == expected[key][split], (split, key)
    assert manifest["quarantined"] == {} and manifest["quarantined_samples_dropped"] == 0
    assert set(manifest["source"]["checksums"]) == {"grefcoco/grefs(unc).json", "grefcoco/instances.json"}
    assert manifest["source_info"] == {"description": "InstAlign synthetic gRefCOCO", "seed": 0, "num_images": 24}
    assert manifest["options"]["rows_per_shard"] == 8 and manifest["instalign_version"]
    assert manifest["created"] and "command" in manifest

    # Sharded per split (16 train images at >= 8 rows per file), the exact versioned schema
    # (as Parquet spells it: list items come back named "element").
    assert len(manifest["files"]["train"]) == 2
    pq.write_table(IMAGE_SCHEMA.empty_table(), tmp_path / "reference.parquet")
    reference = pq.read_schema(tmp_path / "reference.parquet")
    seen = []
    for split in manifest["counts"]:
        for name in manifest["files"][split]:
            schema = pq.read_schema(prepared_dataset / split / name)
            assert schema.equals(reference, check_metadata=True), name
        rows = _rows(prepared_dataset, split)
        assert sum(len(r["samples"]) for r in rows) == manifest["counts"][split]["samples"]
        seen += [r["image_id"] for r in rows]
    assert len(seen) == len(set(seen)) == 24  # each image stored once
    quarantine = pq.read_table(prepared_dataset / QUARANTINE_DIR / "quarantine.parquet")
    assert quarantine.schema.equals(QUARANTINE_SCHEMA) and quarantine.num_rows == 0


def test_round_trip_masks_images_and_text(prepared_dataset, synthetic_root):
    instances = json.loads((synthetic_root / "grefcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    refs = {r["ref_id"]: r for r in json.loads((synthetic_root / "grefcoco" / "grefs(unc).json").read_text())}
    checked = 0
    for split in ("train", "val", "testA", "testB"):
        for row in _rows(prepared_dataset, split):
            info = images[row["image_id"]]
            assert (row["width"], row["height"]) == (row["orig_width"], row["orig_height"]) \
                == (info["width"], info["height"])
            # Kept as released: the stored bytes are the source JPEG.
            src = synthetic_root / "images" / "train2014" / info["file_name"]
            assert row["image"] == src.read_bytes()
            for inst in row["instances"]:
                want = _oracle_mask(anns[inst["ann_id"]]["segmentation"], info["height"], info["width"])
                got = rle_decode(inst["rle"], row["height"], row["width"])
                np.testing.assert_array_equal(got, want)
                checked += 1
            for s in row["samples"]:
                ref = refs[s["ref_id"]]
                assert ref["image_id"] == row["image_id"] and ref["split"] == split
                sent = next(x for x in ref["sentences"] if x["sent_id"] == s["sent_id"])
                assert s["text"] == sent["raw"]
                ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
                assert s["ann_ids"] == ([] if ids == [-1] else ids)
                assert s["no_target"] == (ids == [-1])
    assert checked > 20


def _corrupt_dataset(root: Path) -> dict:
    """Write a small synthetic release with one of every bad record; return what to expect."""
    generated = generate_grefcoco(root, num_images=12, seed=3)
    gdir, idir = root / "grefcoco", root / "images" / "train2014"
    inst = json.loads((gdir / "instances.json").read_text())
    refs = json.loads((gdir / "grefs(unc).json").read_text())
    img = [i["id"] for i in inst["images"]]
    name = {i["id"]: i["file_name"] for i in inst["images"]}
    ids = lambda r: r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]]  # noqa: E731
    targeted = lambda i: [r for r in refs if r["image_id"] == i and r["sentences"] and ids(r) != [-1]]  # noqa: E731

    (idir / name[img[0]]).unlink()  # missing_image
    data = (idir / name[img[1]]).read_bytes()
    (idir / name[img[1]]).write_bytes(data[: len(data) // 2])  # truncated JPEG → corrupt_image
    (idir / name[img[2]]).write_bytes(b"this is not a JPEG at all")  # corrupt_image
    next(i for i in inst["images"] if i["id"] == img[3])["width"] += 7  # image_size_mismatch
    bad_ann = ids(targeted(img[4])[0])[0]  # invalid_segmentation (+ invalid_target per ref using it)
    next(a for a in inst["annotations"] if a["id"] == bad_ann)["segmentation"] = [[1.0, 2.0, 3.0]]
    targeted(img[5])[0]["ann_id"] = [987654]  # missing_annotation
    targeted(img[6])[0]["image_id"] = 888888  # missing_image_record
    targeted(img[7])[0]["ann_id"] = [ids(targeted(img[8])[0])[0]]  # annotation_image_mismatch
    inst["annotations"].append(dict(inst["annotations"][0], id=555555, image_id=999999))  # unknown_image
    (gdir / "instances.json").write_text(json.dumps(inst))
    (gdir / "grefs(unc).json").write_text(json.dumps(refs))

    # The oracle: samples that survive, per split, computed from the edited JSON.
    dropped_images = set(img[:4])
    refs_using_bad = [r for r in refs if bad_ann in ids(r) and r["sentences"]]
    bad_refs = {id(targeted_ref) for targeted_ref in refs_using_bad}
    samples = Counter()
    for r in refs:
        if r["image_id"] in dropped_images or r["image_id"] == 888888 or id(r) in bad_refs:
            continue
        if r["ann_id"] == [987654] or (r["image_id"] == img[7] and ids(r) == [ids(targeted(img[8])[0])[0]]):
            continue
        samples[r["split"]] += len(r["sentences"])
    reasons = {"missing_image": 1, "corrupt_image": 2, "image_size_mismatch": 1, "invalid_segmentation": 1,
               "invalid_target": len({r["ref_id"] for r in refs_using_bad}), "missing_annotation": 1,
               "missing_image_record": 1, "annotation_image_mismatch": 1, "unknown_image": 1}
    return dict(samples=samples, reasons=reasons, images=img, bad_ann=bad_ann,
                dropped=sum(generated["samples"].values()) - sum(samples.values()))


def test_bad_records_are_quarantined_and_counted(ray_local, tmp_path):
    expect = _corrupt_dataset(tmp_path / "src")
    out = tmp_path / "out"
    manifest = prepare_dataset(dataset="grefcoco", root=tmp_path / "src", out=str(out), rows_per_shard=4,
                               image_max_side=64, progress=False)
    assert manifest["quarantined"] == expect["reasons"]
    assert {s: c["samples"] for s, c in manifest["counts"].items() if c["samples"]} == dict(expect["samples"])
    assert manifest["quarantined_samples_dropped"] == expect["dropped"] > 0
    assert (out / MANIFEST_NAME).is_file()

    q = pq.read_table(out / QUARANTINE_DIR / "quarantine.parquet").to_pylist()
    assert Counter(r["reason"] for r in q) == Counter(expect["reasons"])
    by_reason = {r["reason"]: r for r in q}
    img = expect["images"]
    assert by_reason["missing_image"]["image_id"] == img[0] and "cannot read" in by_reason["missing_image"]["detail"]
    assert {r["image_id"] for r in q if r["reason"] == "corrupt_image"} == {img[1], img[2]}
    assert any("truncated" in r["detail"] for r in q if r["reason"] == "corrupt_image")
    assert by_reason["invalid_segmentation"]["ann_id"] == expect["bad_ann"]
    assert "odd number of coordinates" in by_reason["invalid_segmentation"]["detail"]
    assert by_reason["unknown_image"]["ann_id"] == 555555 and by_reason["missing_annotation"]["ann_id"] == 987654
    assert all(r["dataset"] == "grefcoco" for r in q)

    # Shrunk to a 64-pixel long side; masks rasterised at the stored size still line up.
    src = json.loads((tmp_path / "src" / "grefcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in src["annotations"]}
    rows = [r for s in manifest["files"] for r in _rows(out, s)]
    assert rows and {r["image_id"] for r in rows}.isdisjoint(img[:4])
    for row in rows:
        assert max(row["width"], row["height"]) == 64
        for inst in row["instances"]:
            full = _oracle_mask(anns[inst["ann_id"]]["segmentation"], row["orig_height"], row["orig_width"])
            want = resize_mask_nearest(full, row["height"], row["width"])
            got = rle_decode(inst["rle"], row["height"], row["width"])
            iou = (got & want).sum() / max((got | want).sum(), 1)
            assert iou > 0.7, (row["image_id"], inst["ann_id"], iou)


def test_strict_fails_with_the_first_records_and_writes_nothing(ray_local, synthetic_root, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "images" / "train2014").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:300])  # only a worker can see this one
    out = tmp_path / "out"
    with pytest.raises(PrepareError) as err:
        prepare_dataset(dataset="grefcoco", root=root, out=str(out), strict=True, progress=False)
    assert "--strict: 1 bad record" in str(err.value) and "[corrupt_image]" in str(err.value)
    assert victim.name in str(err.value)
    assert not out.exists() or not any(out.rglob("*"))


def test_a_new_process_reads_in_a_child_while_ray_starts_and_writes_the_same_dataset(prepared_dataset,
                                                                                     synthetic_root, tmp_path):
    """The CLI in a fresh process (no Ray yet) forks its reader (``pipelines.core.forked``); a
    process already connected to Ray (this one: ``prepared_dataset``) reads inline. The two
    datasets are the same, shard for shard."""
    out = tmp_path / "forked"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", "--dataset", "grefcoco", "--root",
                           str(synthetic_root), "--out", str(out), "--rows-per-shard", "8", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert "Ray started in" in proc.stderr and "while a child process read the release" in proc.stderr
    assert "read the release in" in proc.stderr  # the child's own log line reaches the same stderr
    forked, inline = (json.loads((d / MANIFEST_NAME).read_text()) for d in (out, prepared_dataset))
    for key in ("counts", "files", "quarantined", "quarantined_samples_dropped", "source"):
        assert forked[key] == inline[key], key
    names = [f"{split}/{name}" for split, files in inline["files"].items() for name in files]
    for name in names + [f"{QUARANTINE_DIR}/quarantine.parquet"]:
        assert pq.read_table(out / name).equals(pq.read_table(prepared_dataset / name)), name


def test_rerun_refuses_without_overwrite(prepared_dataset, synthetic_root):
    before = (prepared_dataset / MANIFEST_NAME).read_text()
    with pytest.raises(PrepareError, match="already holds a finished dataset.*--overwrite"):
        prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(prepared_dataset))
    assert (prepared_dataset / MANIFEST_NAME).read_text() == before


def test_interrupted_run_leaves_no_manifest_then_overwrite_recovers(ray_local, synthetic_root, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the manifest")

    monkeypatch.setattr(prep, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(out), splits=["val"], progress=False)
    assert not (out / MANIFEST_NAME).exists() and list((out / "val").glob("*.parquet"))
    monkeypatch.undo()

    with pytest.raises(PrepareError, match="earlier \\(possibly interrupted\\) run"):
        prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(out), splits=["val"])
    manifest = prepare_dataset(dataset="grefcoco", root=synthetic_root, out=str(out), splits=["val"],
                               overwrite=True, progress=False)
    assert list(manifest["counts"]) == ["val"] and (out / MANIFEST_NAME).is_file()
    assert not list(out.glob(".*tmp"))  # the temporary manifest was renamed, not left behind
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest


def test_the_plan_carries_the_release_info_block_for_the_manifest(synthetic_root):
    """What ``_build`` writes as the manifest's ``source_info``: planned on the driver, no Ray."""
    from instalign.data.release_files import locate_release

    plan = prep._read_and_plan(locate_release("grefcoco", synthetic_root), splits=None, root=str(synthetic_root),
                               strict=False, rows_per_shard=8)
    assert plan.source_info == {"description": "InstAlign synthetic gRefCOCO", "seed": 0, "num_images": 24}


def test_the_manifest_keeps_a_small_redacted_info_block():
    """A release's file decides its ``info``: the manifest keeps short scalar entries, redacted."""
    info = {"description": "COCO 2014 Dataset", "year": 2014, "version": 1.0, "flag": True, "nan": float("nan"),
            "huge": 10 ** 30, "nested": {"a": 1}, "list": [1, 2], 7: "not a string key",
            "url": "https://alice:hunter2@example.com/coco?token=abc", "long": "x" * 500, "vast": "y" * 20_000,
            "k" * 100: "long key"}
    kept = manifest_source_info(info)
    assert kept == {"description": "COCO 2014 Dataset", "year": 2014, "version": 1.0,
                    "url": "https://***@example.com/coco?token=***", "long": "x" * 200, "k" * 64: "long key"}
    assert len(manifest_source_info({f"k{i}": i for i in range(100)})) == 16
    assert manifest_source_info({}) == {}


def test_write_manifest_is_atomic(tmp_path):
    fs, path = prep.resolve_output(str(tmp_path))
    prep.write_manifest(fs, path, {"a": 1})
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]

    class RenameFails:  # the local filesystem, except that the final rename dies
        type_name = "local"

        def __getattr__(self, name):
            return getattr(fs, name)

        def move(self, src, dst):
            raise OSError("disk vanished")

    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(OSError, match="disk vanished"):
        prep.write_manifest(RenameFails(), path, {"a": 2})
    assert list(tmp_path.iterdir()) == []  # neither a manifest nor the temporary file


@pytest.mark.ray  # prepare starts Ray while its child reads the release
def test_cli_reports_bad_arguments(synthetic_root, tmp_path, capsys):
    from pipelines.cli import main

    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(synthetic_root), "--out", str(tmp_path / "o"),
               "--splits", "train,nope"])
    assert rc == 1 and "split(s) ['nope'] not in the release" in capsys.readouterr().err
    rc = main(["prepare", "--dataset", "grefcoco", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "cannot read grefcoco" in capsys.readouterr().err
