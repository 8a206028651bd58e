"""Readers on tiny releases in the official formats: every quirk, every malformed-file error."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from tests.support.fixtures_official import Expected, write_grefcoco, write_refcoco, write_refzom
from instalign.data.masks import rle_decode, segmentation_to_rle
from instalign.data import readers
from instalign.data.readers import (SourceFormatError, gc_paused, read_grefcoco, read_refcoco, read_refzom,
                                    read_source, reference_problems)
from instalign.data.safe_pickle import UnsafePickleError
from instalign.data.source import GRESSource




def _as_expected(src: GRESSource) -> dict[int, Expected]:
    return {r.ref_id: Expected(r.image_id, r.split, r.ann_ids, r.no_target, tuple(s.text for s in r.sentences))
            for r in src.refs}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ gRefCOCO
def test_grefcoco_reads_every_quirk(tmp_path, caplog):
    expected = write_grefcoco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="instalign.data.readers"):
        src = read_grefcoco(tmp_path)
    assert src.dataset == "grefcoco"
    assert _as_expected(src) == expected
    assert src.splits() == ["testA", "testB", "train", "val"]
    # Disagreeing no_target flags (refs 6, 7) and a crowd-only ref (4) are reported, not hidden.
    assert "disagrees" in caplog.text and "ann_id wins" in caplog.text
    assert "crowd" in caplog.text


def test_grefcoco_images_keyed_by_image_id_not_ref_file_name(tmp_path):
    write_grefcoco(tmp_path)
    src = read_grefcoco(tmp_path)
    img = src.images[1001]
    assert Path(img.path) == tmp_path / "images" / "train2014" / "COCO_train2014_000000001001.jpg"
    assert Path(img.path).is_file()
    assert (img.width, img.height) == (40, 30)
    assert set(src.images) == {1001, 1002, 1003}
    for ref in src.refs:
        assert not Path(src.images[ref.image_id].path).name.endswith(f"_{ref.ref_id + 3}.jpg")


def test_grefcoco_annotations_kept_as_released_and_decodable(tmp_path):
    write_grefcoco(tmp_path)
    src = read_grefcoco(tmp_path)
    assert isinstance(src.annotations[11].segmentation, list)  # polygons
    assert isinstance(src.annotations[12].segmentation["counts"], str)  # compressed RLE
    assert isinstance(src.annotations[13].segmentation["counts"], list)  # uncompressed RLE
    areas = {}
    for ann_id, ann in src.annotations.items():
        img = src.images[ann.image_id]
        rle = segmentation_to_rle(ann.segmentation, img.height, img.width)
        areas[ann_id] = int(rle_decode(rle["counts"], img.height, img.width).sum())
    assert areas == {11: 225, 12: 225, 13: 400, 14: 450, 15: 100, 16: 100}


def test_grefcoco_checksums_are_sha256_of_the_source_files(tmp_path):
    write_grefcoco(tmp_path)
    src = read_grefcoco(tmp_path)
    refs, inst = tmp_path / "grefcoco" / "grefs(unc).json", tmp_path / "grefcoco" / "instances.json"
    assert src.checksums == {"grefcoco/grefs(unc).json": _sha(refs), "grefcoco/instances.json": _sha(inst)}


def test_grefcoco_layout_overrides(tmp_path):
    expected = write_grefcoco(tmp_path / "orig")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "orig" / "grefcoco" / "grefs(unc).json").rename(moved / "my_refs.json")
    (tmp_path / "orig" / "grefcoco" / "instances.json").rename(moved / "my_instances.json")
    src = read_grefcoco(tmp_path / "nothing_here", refs_file=moved / "my_refs.json",
                        instances_file=moved / "my_instances.json", image_dir=tmp_path / "imgs")
    assert _as_expected(src) == expected
    assert Path(src.images[1002].path) == tmp_path / "imgs" / "COCO_train2014_000000001002.jpg"
    # Outside the root the checksum key is the absolute path.
    assert str((moved / "my_refs.json").resolve()) in src.checksums


def test_grefcoco_pickle_refs_are_read_safely(tmp_path):
    expected = write_grefcoco(tmp_path)
    refs = json.loads((tmp_path / "grefcoco" / "grefs(unc).json").read_text())
    (tmp_path / "grefcoco" / "grefs(unc).json").unlink()
    with open(tmp_path / "grefcoco" / "grefs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    assert _as_expected(read_grefcoco(tmp_path)) == expected


def test_missing_files_name_the_path_and_the_override(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.json.*refs_file="):
        read_grefcoco(tmp_path)
    write_grefcoco(tmp_path)
    (tmp_path / "grefcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances\.json.*instances_file="):
        read_grefcoco(tmp_path)


def _corrupt_refs(root: Path, mutate) -> Path:
    path = root / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    mutate(refs)
    path.write_text(json.dumps(refs))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda refs: refs[2].pop("image_id"), r"ref #2 \(ref_id=2\): missing key 'image_id'"),
    (lambda refs: refs[1].update(ann_id="11"), r"ref #1 \(ref_id=1\): key 'ann_id' must be an int or a list of ints"),
    (lambda refs: refs[1].update(ann_id=[11, -1]), r"mixes -1"),
    (lambda refs: refs[1].update(ann_id=[]), r"empty list"),
    (lambda refs: refs[0].update(split=3), r"key 'split' must be a string"),
    (lambda refs: refs[0].update(ref_id=True), r"ref #0: key 'ref_id' must be an int"),
    (lambda refs: refs[0].update(sentences="the dog"), r"key 'sentences' must be a list"),
    (lambda refs: refs[0]["sentences"][1].pop("sent_id"), r"sentences\[1\]: missing key 'sent_id'"),
    (lambda refs: refs[0]["sentences"][0].update(raw=None, sent=""), r"sentences\[0\]: no text"),
    (lambda refs: refs[3].update(no_target="yes"), r"key 'no_target' must be a bool"),
    (lambda refs: refs.__setitem__(4, ["not", "a", "dict"]), r"ref #4 must be an object/dict"),
])
def test_malformed_refs_name_the_file_and_the_record(tmp_path, mutate, message):
    write_grefcoco(tmp_path)
    path = _corrupt_refs(tmp_path, mutate)
    with pytest.raises(SourceFormatError, match=message) as info:
        read_grefcoco(tmp_path)
    assert str(info.value).startswith(str(path))


def test_repeated_ann_ids_in_one_ref_are_kept_once(tmp_path):
    write_grefcoco(tmp_path)
    _corrupt_refs(tmp_path, lambda refs: refs[1].update(ann_id=[12, 11, 12]))
    assert {r.ref_id: r.ann_ids for r in read_grefcoco(tmp_path).refs}[1] == (12, 11)


def test_refs_file_that_is_not_json(tmp_path):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "grefs(unc).json"
    path.write_text('[{"ref_id": 0,')
    with pytest.raises(SourceFormatError, match=r"not valid JSON \(line 1"):
        read_grefcoco(tmp_path)
    path.write_text('{"images": []}')
    with pytest.raises(SourceFormatError, match=r"grefs\(unc\)\.json: must hold a list of refs, got dict"):
        read_grefcoco(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("annotations"), r"key 'annotations' must be a list, got nothing"),
    (lambda d: d.update(images={}), r"key 'images' must be a list, got dict"),
    (lambda d: d["images"][1].pop("width"), r"images\[1\]: missing key 'width'"),
    (lambda d: d["images"][0].update(height=0), r"images\[0\]: image 1001 has size 40x0"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"duplicate image id 1001"),
    (lambda d: d["annotations"][2].update(segmentation="abc"), r"annotations\[2\]: key 'segmentation' must be"),
    (lambda d: d["annotations"][0].update(image_id="1001"), r"annotations\[0\]: key 'image_id' must be an int"),
    (lambda d: d["annotations"][0].update(iscrowd=7), r"key 'iscrowd' must be 0 or 1"),
])
def test_malformed_instances_name_the_file_and_the_record(tmp_path, mutate, message):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "instances.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(SourceFormatError, match=message) as info:
        read_grefcoco(tmp_path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("info, kept", [
    ({"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "year": 2014,
      "extra": {"nested": [1]}}, {"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "year": 2014,
                                  "extra": {"nested": [1]}}),
    ("a release whose info is not a mapping", {}),
    (None, {}),
])
def test_the_instances_info_block_is_kept_as_released_or_empty(tmp_path, info, kept):
    """COCO's ``info`` is descriptive: kept as it is when it is a mapping, never a reason to refuse."""
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "instances.json"
    data = json.loads(path.read_text())
    if info is None:
        del data["info"]
    else:
        data["info"] = info
    path.write_text(json.dumps(data))
    assert read_grefcoco(tmp_path).info == kept


def test_instances_not_json(tmp_path):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "instances.json"
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(SourceFormatError, match=r"instances\.json: not valid JSON"):
        read_grefcoco(tmp_path)


def test_reference_problems_are_left_for_quarantine(tmp_path):
    write_grefcoco(tmp_path)

    def mutate(refs):
        refs[0]["image_id"] = 9999  # image not in instances.json
        refs[1]["ann_id"] = [11, 77]  # annotation 77 does not exist
        refs[7]["ann_id"] = [12]  # annotation 12 belongs to image 1001, the ref to 1003
    _corrupt_refs(tmp_path, mutate)
    src = read_grefcoco(tmp_path)  # structure is fine: reading succeeds
    problems = {(p["ref_id"], p["reason"], p["ann_id"]) for p in reference_problems(src)}
    assert problems == {(0, "missing_image_record", -1), (1, "missing_annotation", 77),
                        (7, "annotation_image_mismatch", 12)}
    assert reference_problems(read_grefcoco(_fresh(tmp_path))) == []


def _fresh(tmp_path: Path) -> Path:
    root = tmp_path / "fresh"
    write_grefcoco(root)
    return root


# ------------------------------------------------------------------- Ref-ZOM
def test_refzom_reads_protocol2_pickle_and_zero_source(tmp_path):
    expected = write_refzom(tmp_path)
    src = read_refzom(tmp_path)
    assert src.dataset == "refzom"
    assert _as_expected(src) == expected
    assert src.splits() == ["test", "train"]
    # train2014 and val2014 images live in one folder, found by instances' file_name.
    assert Path(src.images[2001].path) == tmp_path / "images" / "trainval2014" / "COCO_train2014_000000002001.jpg"
    assert Path(src.images[2002].path) == tmp_path / "images" / "trainval2014" / "COCO_val2014_000000002002.jpg"
    assert all(Path(i.path).is_file() for i in src.images.values())
    assert set(src.checksums) == {"ref-zom/refs(final).p", "ref-zom/instances.json"}
    assert src.checksums["ref-zom/refs(final).p"] == _sha(tmp_path / "ref-zom" / "refs(final).p")


def test_refzom_errors(tmp_path):
    write_refzom(tmp_path)
    path = tmp_path / "ref-zom" / "refs(final).p"
    refs = pickle.loads(path.read_bytes())
    refs[1].pop("source")
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(SourceFormatError, match=r"refs\(final\)\.p: ref #1 \(ref_id=1\): missing key 'source'"):
        read_refzom(tmp_path)
    refs[1]["source"] = "many"
    refs[1]["ann_id"] = -1
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(SourceFormatError, match=r"names no annotation but source is 'many'"):
        read_refzom(tmp_path)
    path.write_bytes(b"\x80\x02]q\x00(")  # truncated pickle
    with pytest.raises(SourceFormatError, match=r"refs\(final\)\.p: not a readable pickle"):
        read_refzom(tmp_path)


def test_refzom_hostile_pickle_is_refused_and_does_nothing(tmp_path):
    write_refzom(tmp_path)
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "ref-zom" / "refs(final).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Hostile()}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(final\)\.p: refused to load global '(posix|os|nt)\.system'"):
        read_refzom(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------ RefCOCO/+/g
@pytest.mark.parametrize("dataset, split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"),
                                               ("refcocog", "google")])
def test_refcoco_family(tmp_path, dataset, split_by):
    expected = write_refcoco(tmp_path, dataset, split_by)
    src = read_refcoco(tmp_path, dataset, split_by)
    assert src.dataset == dataset
    assert _as_expected(src) == expected  # raw text ("THING NUMBER 0") preferred over sent
    assert Path(src.images[3001].path) == tmp_path / "images" / "train2014" / "COCO_train2014_000000003001.jpg"
    assert set(src.checksums) == {f"{dataset}/refs({split_by}).p", f"{dataset}/instances.json"}
    assert _as_expected(read_source(dataset, tmp_path, split_by=split_by)) == expected


def test_refcoco_rejects_unknown_combinations(tmp_path):
    with pytest.raises(ValueError, match=r"refcoco\+ is released split by \('unc',\), not 'umd'"):
        read_refcoco(tmp_path, "refcoco+", "umd")
    with pytest.raises(ValueError, match="dataset must be one of"):
        read_refcoco(tmp_path, "refclef", "unc")
    with pytest.raises(ValueError, match="unknown dataset"):
        read_source("coco", tmp_path)


def test_refcoco_never_has_no_target(tmp_path):
    write_refcoco(tmp_path)
    path = tmp_path / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    refs[2]["ann_id"] = -1
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(SourceFormatError,
                       match=r"ref #2 \(ref_id=42\): ann_id \[-1\]: RefCOCO refs always have a target"):
        read_refcoco(tmp_path, "refcoco", "unc")


def test_read_source_dispatch(tmp_path):
    g, z = write_grefcoco(tmp_path / "g"), write_refzom(tmp_path / "z")
    assert _as_expected(read_source("grefcoco", tmp_path / "g")) == g
    assert _as_expected(read_source("refzom", tmp_path / "z")) == z


# ------------------------------------------------------------------ the cycle collector
def test_gc_paused_turns_the_collector_back_on_however_the_block_ends():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with gc_paused():
            raise ValueError("a malformed release")
    assert gc.isenabled()
    gc.disable()  # a caller that had switched it off keeps it off
    try:
        with gc_paused():
            with gc_paused():
                pass
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_release_is_parsed_and_planned_with_the_collector_off(tmp_path, monkeypatch):
    """The collector walks every object a release becomes, again and again: more than half of
    a large read (``gc_paused``). Reading, and ``prepare``'s planning, run without it."""
    from pipelines.data import records as prepare_records
    write_grefcoco(tmp_path)
    seen = {}

    def noting(step, fn):
        def wrapped(*args):
            seen.setdefault(step, gc.isenabled())
            return fn(*args)
        return wrapped

    monkeypatch.setattr(readers, "_parse_refs", noting("read", readers._parse_refs))
    monkeypatch.setattr(prepare_records, "_task_instance", noting("plan", prepare_records._task_instance))
    prepare_records.plan_tasks(read_grefcoco(tmp_path))
    assert seen == {"read": False, "plan": False} and gc.isenabled()
