"""``instalign prepare``'s driver side (``pipelines.data.records``): a release's records checked
against each other and grouped into one task per image. Real releases written by the
synthetic generator and edited as a careless or hostile release would be; no Ray."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from instalign.data.readers import read_source
from pipelines.data.records import PrepareError, plan_tasks, quarantine_record, to_task_table


def edit(root, name: str, change) -> None:
    path = root / "grefcoco" / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_clean_release_is_one_task_per_image_and_split_with_every_sentence(synthetic_root):
    source = read_source("grefcoco", str(synthetic_root))
    tasks, records, empty_refs, dropped = plan_tasks(source, image_root=synthetic_root)
    assert records == [] and dropped == 0
    pairs = [(t["image_id"], t["split"]) for t in tasks]
    assert len(pairs) == len(set(pairs)) == len({(r.image_id, r.split) for r in source.refs if r.sentences})
    assert sum(len(t["samples"]) for t in tasks) == sum(len(r.sentences) for r in source.refs)
    assert sum(empty_refs.values()) == sum(1 for r in source.refs if not r.sentences)
    assert to_task_table(tasks, str(synthetic_root)).num_rows == len(tasks)
    only_val, *_ = plan_tasks(source, ["val"], image_root=synthetic_root)
    assert {t["split"] for t in only_val} == {"val"}


def test_a_split_that_is_not_there_or_not_safe_is_refused_naming_it(synthetic_root):
    source = read_source("grefcoco", str(synthetic_root))
    with pytest.raises(PrepareError, match=r"split\(s\) \['nope'\] not in the release; available: "):
        plan_tasks(source, ["nope"])
    with pytest.raises(PrepareError, match=r"split name '\.\./x' is not a safe directory name"):
        plan_tasks(source, ["../x"])


def test_records_that_do_not_fit_together_are_quarantined_naming_them(synthetic_root, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
    victim = next(r for r in refs if isinstance(r["ann_id"], list) and -1 not in r["ann_id"] and r["sentences"])
    edit(root, "instances.json", lambda d: d["annotations"].append(
        {**d["annotations"][0], "id": 987654, "image_id": 424242}))
    edit(root, "grefs(unc).json", lambda d: next(r for r in d if r["ref_id"] == victim["ref_id"])["ann_id"].append(555555))
    _, records, _, dropped = plan_tasks(read_source("grefcoco", str(root)), image_root=root)
    by_reason = {r["reason"]: r for r in records}
    assert set(by_reason) == {"unknown_image", "missing_annotation"}
    assert by_reason["unknown_image"]["ann_id"] == 987654 and "424242" in by_reason["unknown_image"]["detail"]
    assert by_reason["missing_annotation"]["ref_id"] == victim["ref_id"] and dropped == len(victim["sentences"])


def test_a_quarantine_row_names_what_it_is_about():
    assert quarantine_record(dataset="grefcoco", ref_id=3, reason="r", detail="d") == dict(
        dataset="grefcoco", split="", image_id=-1, ref_id=3, ann_id=-1, reason="r", detail="d")


def test_a_value_the_schema_cannot_hold_is_one_line_naming_the_root():
    with pytest.raises(PrepareError, match=r"^/data/x: a record does not fit the dataset schema"):
        to_task_table([{"image_id": 2**70, "split": "train"}], "/data/x")


def test_plan_tasks_counts_what_the_quarantine_drops(synthetic_root, tmp_path):
    """Driver side only: path_escape and unsafe_split drop exactly their samples."""

    root = tmp_path / "src"
    shutil.copytree(synthetic_root, root)
    inst_path, refs_path = root / "grefcoco" / "instances.json", root / "grefcoco" / "grefs(unc).json"
    inst, refs = json.loads(inst_path.read_text()), json.loads(refs_path.read_text())
    target = next(r["image_id"] for r in refs if r["sentences"])
    next(i for i in inst["images"] if i["id"] == target)["file_name"] = "/etc/passwd"
    other = next(r for r in refs if r["sentences"] and r["image_id"] != target)
    other["split"] = ".."
    inst_path.write_text(json.dumps(inst))
    refs_path.write_text(json.dumps(refs))

    tasks, records, _, dropped = plan_tasks(read_source("grefcoco", str(root)), image_root=root)
    assert Counter(r["reason"] for r in records) == {"path_escape": 1, "unsafe_split": 1}
    escaped_samples = sum(len(r["sentences"]) for r in refs if r["image_id"] == target and r["split"] != "..")
    assert dropped == escaped_samples + len(other["sentences"])
    assert all(t["image_id"] != target for t in tasks) and all(t["split"] != ".." for t in tasks)
    assert all(t["path"].startswith(str(root)) for t in tasks)

