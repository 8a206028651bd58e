"""Hostile release files end in a SourceFormatError naming the file and record (issue 11),
and what the readers keep for prepare to quarantine (unsafe split names, escaping paths)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from tests.support.fixtures_official import write_grefcoco, write_refzom
from instalign.data.readers import SourceFormatError, read_grefcoco, read_refzom
from instalign.data.release_checks import is_safe_split_name


def _edit_json(path: Path, mutate) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def test_deeply_nested_json_is_a_format_error_not_a_recursion_error(tmp_path):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "grefs(unc).json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SourceFormatError, match=r"grefs\(unc\)\.json: JSON nested too deeply") as err:
        read_grefcoco(tmp_path)
    assert "\n" not in str(err.value)


def test_huge_int_literal_is_a_format_error(tmp_path):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "instances.json"
    path.write_text('{"images": [{"id": ' + "9" * 5000 + "}]}")
    with pytest.raises(SourceFormatError, match=r"instances\.json: not valid JSON"):
        read_grefcoco(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda refs: refs[0].update(ref_id=2 ** 63), r"ref #0: key 'ref_id' holds 9223372036854775808, outside the "
                                                  r"signed 64-bit range"),
    (lambda refs: refs[1].update(image_id=-(2 ** 63) - 1), r"key 'image_id' holds -9223372036854775809"),
    (lambda refs: refs[1].update(ann_id=[11, 2 ** 64]), r"key 'ann_id' holds 18446744073709551616"),
    (lambda refs: refs[1].update(category_id=2 ** 31), r"key 'category_id' holds 2147483648, outside the signed "
                                                       r"32-bit range"),
    (lambda refs: refs[0]["sentences"][0].update(sent_id=2 ** 70), r"sentences\[0\]: key 'sent_id' holds"),
])
def test_ids_beyond_the_stored_range_name_the_record(tmp_path, mutate, message):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "grefs(unc).json"
    _edit_json(path, mutate)
    with pytest.raises(SourceFormatError, match=message) as err:
        read_grefcoco(tmp_path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["images"][0].update(id=2 ** 63), r"images\[0\]: key 'id' holds 9223372036854775808"),
    (lambda d: d["images"][0].update(width=2 ** 31), r"images\[0\]: key 'width' holds 2147483648, outside the "
                                                     r"signed 32-bit"),
    (lambda d: d["annotations"][0].update(category_id=-(2 ** 31) - 1), r"annotations\[0\]: key 'category_id'"),
    (lambda d: d["annotations"][1].update(segmentation=[[[[0, 1, 2]]]]),
     r"annotations\[1\]: key 'segmentation' is nested more than 3 levels deep"),
])
def test_instances_beyond_range_or_too_deep(tmp_path, mutate, message):
    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "instances.json"
    _edit_json(path, mutate)
    with pytest.raises(SourceFormatError, match=message) as err:
        read_grefcoco(tmp_path)
    assert str(err.value).startswith(str(path))


def test_plausible_malformed_segmentations_are_left_for_quarantine(tmp_path):
    write_grefcoco(tmp_path)
    _edit_json(tmp_path / "grefcoco" / "instances.json",
               lambda d: d["annotations"][0].update(segmentation=[[[0, 0], [4, 0], [4, 4]]]))
    src = read_grefcoco(tmp_path)  # prepare quarantines it as invalid_segmentation, one annotation only
    assert any(a.segmentation == [[[0, 0], [4, 0], [4, 4]]] for a in src.annotations.values())


def test_pickled_id_beyond_int64(tmp_path):
    write_refzom(tmp_path)
    path = tmp_path / "ref-zom" / "refs(final).p"
    refs = pickle.loads(path.read_bytes())
    refs[0]["image_id"] = 10 ** 400  # a pickle carries any int; str() of it would still work here
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(SourceFormatError, match=r"refs\(final\)\.p: ref #0 \(ref_id=0\): key 'image_id' holds "
                                                r"an int of 1329 bits"):
        read_refzom(tmp_path)


@pytest.mark.parametrize("name, ok", [
    ("train", True), ("testA", True), ("val_2", True), ("v1.0-test", True), ("_x", True), ("9", True),
    ("../../escaped", False), ("..", False), (".", False), (".hidden", False), ("a/b", False), ("a\\b", False),
    ("/abs", False), ("", False), ("x" * 65, False), ("tab\t", False), ("new\nline", False), ("sp ace", False),
    (3, False), (None, False), ("-rf", False),
])
def test_safe_split_names(name, ok):
    assert is_safe_split_name(name) is ok


def test_readers_keep_what_prepare_quarantines(tmp_path):
    write_grefcoco(tmp_path)
    _edit_json(tmp_path / "grefcoco" / "grefs(unc).json", lambda refs: refs[0].update(split="../../escaped"))
    _edit_json(tmp_path / "grefcoco" / "instances.json",
               lambda d: d["images"][0].update(file_name="/etc/passwd"))
    src = read_grefcoco(tmp_path)
    assert "../../escaped" in src.splits()
    assert any(i.path == "/etc/passwd" for i in src.images.values())


def test_deeply_nested_pickle_value_is_a_format_error(tmp_path):
    """A pickle builds nesting without recursion; the error message must not recurse either."""
    write_refzom(tmp_path)
    depth = 200_000
    nested = b"]" * depth + b"a" * (depth - 1)  # EMPTY_LIST ... APPEND: a list inside a list, 200 000 deep
    payload = (b"\x80\x02]}(X\x06\x00\x00\x00ref_idK\x00X\x06\x00\x00\x00ann_id" + nested + b"ua.")
    (tmp_path / "ref-zom" / "refs(final).p").write_bytes(payload)
    with pytest.raises(SourceFormatError, match=r"ref #0 \(ref_id=0\): key 'ann_id' must be an int or a list of "
                                                r"ints, got list \[\[\[\.\.\.\]\]\]") as err:
        read_refzom(tmp_path)
    assert len(str(err.value)) < 300


def test_release_file_that_is_a_fifo_or_device_is_refused_unread(tmp_path):
    write_grefcoco(tmp_path)
    refs = tmp_path / "grefcoco" / "grefs(unc).json"
    refs.unlink()
    os.mkfifo(refs)  # json.load would wait for a writer forever
    with pytest.raises(SourceFormatError, match=r"grefs\(unc\)\.json is not a regular file"):
        read_grefcoco(tmp_path)
    refs.unlink()
    refs.symlink_to("/dev/zero")
    with pytest.raises(SourceFormatError, match="not a regular file"):
        read_grefcoco(tmp_path)


@pytest.mark.parametrize("name, problem", [
    ("COCO_1.jpg", None), ("sub/../sub/é.jpg", None),
    ("COCO\0.jpg", "it holds a NUL byte"),
    ("COCO_\ud800.jpg", "its character '\\ud800' cannot be encoded (utf-8: surrogates not allowed)"),
])
def test_file_names_that_cannot_name_a_file(name, problem):
    from instalign.data.release_checks import file_name_problem

    assert file_name_problem(name) == problem


def test_a_nul_file_name_is_quarantined_while_planning(synthetic_root, tmp_path):
    """Driver side (no Ray): the image whose ``file_name`` holds a NUL is ``invalid_file_name``, with
    its samples counted; before, the worker's ``os.stat`` raised ``ValueError: embedded null byte``."""
    import shutil

    from instalign.data.readers import read_source
    from pipelines.data.records import plan_tasks, to_task_table

    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    inst_path = root / "grefcoco" / "instances.json"
    refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
    target = next(r["image_id"] for r in refs if r["sentences"])
    _edit_json(inst_path, lambda d: next(i for i in d["images"] if i["id"] == target).update(file_name="a\0b.jpg"))
    tasks, records, _, dropped = plan_tasks(read_source("grefcoco", str(root)), image_root=root)
    assert [(r["reason"], r["image_id"]) for r in records] == [("invalid_file_name", target)]
    assert "a\\x00b.jpg' cannot name a file: it holds a NUL byte" in records[0]["detail"]
    assert dropped == sum(len(r["sentences"]) for r in refs if r["image_id"] == target)
    assert target not in {t["image_id"] for t in tasks} and len(tasks) > 0
    to_task_table(tasks, str(root))  # the rest goes on to the workers
