"""The synthetic gRefCOCO: official format, counts, determinism, targets right by construction."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from instalign.data.masks import rle_decode, segmentation_to_rle
from instalign.data.readers import read_grefcoco, reference_problems
from instalign.data.synthetic import COLOURS, SHAPES, SPLITS, generate_grefcoco


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    counts = generate_grefcoco(root, num_images=24, seed=0)
    return root, counts, read_grefcoco(root)


def _masks(src):
    out = {}
    for ann_id, ann in src.annotations.items():
        img = src.images[ann.image_id]
        out[ann_id] = rle_decode(segmentation_to_rle(ann.segmentation, img.height, img.width)["counts"],
                                 img.height, img.width)
    return out


def test_counts_equal_what_the_reader_sees(generated):
    _, counts, src = generated
    assert set(counts) == {"images", "refs", "samples", "no_target_samples", "multi_target_samples"}
    seen = {k: Counter() for k in counts}
    images = {s: set() for s in SPLITS}
    for r in src.refs:
        images[r.split].add(r.image_id)
        seen["refs"][r.split] += 1
        seen["samples"][r.split] += len(r.sentences)
        seen["no_target_samples"][r.split] += len(r.sentences) * r.no_target
        seen["multi_target_samples"][r.split] += len(r.sentences) * (len(r.ann_ids) > 1)
    seen["images"] = Counter({s: len(v) for s, v in images.items()})
    assert {k: {s: seen[k][s] for s in SPLITS} for k in counts} == counts
    assert all(counts["images"][s] > 0 for s in SPLITS)
    assert sum(counts["images"].values()) == len(src.images) == 24
    totals = {k: sum(v.values()) for k, v in counts.items()}
    assert 0 < totals["no_target_samples"] < totals["samples"]
    assert 0 < totals["multi_target_samples"] < totals["samples"]
    assert reference_problems(src) == []


def test_release_format_and_quirks(generated):
    root, _, src = generated
    refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
    inst = json.loads((root / "grefcoco" / "instances.json").read_text())
    assert set(inst) >= {"images", "annotations", "categories"}
    assert [c["name"] for c in inst["categories"]] == list(SHAPES)
    single = [r for r in refs if r["ann_id"] != [-1] and len(np.atleast_1d(r["ann_id"])) == 1]
    assert any(isinstance(r["ann_id"], int) for r in single) and any(isinstance(r["ann_id"], list) for r in single)
    no_target = [r for r in refs if r["ann_id"] == [-1]]
    assert no_target and all(r["no_target"] for r in no_target)
    assert any(not r["sentences"] for r in refs)
    for r in refs:  # RefCOCO-style suffixed names that are not image files
        assert re.fullmatch(rf"COCO_train2014_{r['image_id']:012d}_\d+\.jpg", r["file_name"])
        assert not (root / "images" / "train2014" / r["file_name"]).exists()
        assert len({s["sent_id"] for s in r["sentences"]}) == len(r["sentences"]) == len(r["sent_ids"])
        assert all(s["tokens"] == s["sent"].split() for s in r["sentences"])
    kinds = Counter("polygon" if isinstance(a["segmentation"], list) else
                    "rle_" + type(a["segmentation"]["counts"]).__name__ for a in inst["annotations"])
    assert kinds["polygon"] and kinds["rle_str"] and kinds["rle_list"]
    by_cat = {a["id"]: a["category_id"] for a in inst["annotations"]}
    assert all(by_cat[a["id"]] == 1 for a in inst["annotations"] if isinstance(a["segmentation"], dict)
               and isinstance(a["segmentation"]["counts"], list))  # uncompressed RLE: circles only
    sizes = set()
    for img in src.images.values():  # image files exist, at the stated (varied, non-square) sizes
        with Image.open(img.path) as im:
            assert im.size == (img.width, img.height) and im.mode == "RGB"
        assert img.width != img.height and 96 <= min(img.width, img.height) <= max(img.width, img.height) <= 320
        sizes.add((img.width, img.height))
    assert len(sizes) > 12


def _colour_of(pixels: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour nearest to the median pixel inside ``mask`` (read from the JPEG)."""
    median = np.median(pixels[mask], axis=0)
    return min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - median).sum())


def test_targets_are_consistent_with_the_pictures_and_the_words(generated):
    """Checks every sentence against what is *in the image* (colours read from the JPEG)."""
    _, _, src = generated
    masks = _masks(src)
    by_image: dict[int, list[int]] = {}
    for ann in src.annotations.values():
        by_image.setdefault(ann.image_id, []).append(ann.ann_id)
    colour, shape, pixels = {}, {}, {}
    for image_id, ann_ids in by_image.items():
        pixels[image_id] = np.asarray(Image.open(src.images[image_id].path).convert("RGB"), dtype=np.int64)
        for a in ann_ids:
            assert masks[a].sum() >= 20, "every object keeps a visible region"
            colour[a] = _colour_of(pixels[image_id], masks[a])
            shape[a] = SHAPES[src.annotations[a].category_id - 1]
    overlapping = 0
    for ann_ids in by_image.values():
        union = np.zeros_like(masks[ann_ids[0]], dtype=np.int64)
        for a in ann_ids:
            union += masks[a]
        overlapping += int(union.max() > 1)
    assert overlapping == 0, "visible masks of different objects never overlap (occlusion is resolved)"

    checked = Counter()
    for ref in src.refs:
        anns = by_image[ref.image_id]
        if ref.ann_ids:
            union = np.logical_or.reduce([masks[a] for a in ref.ann_ids])
            assert union.any()
            assert all(src.annotations[a].image_id == ref.image_id for a in ref.ann_ids)
        for s in ref.sentences:
            words = s.text.split()
            if m := re.fullmatch(r"all (\w+)s|the (\w+)s|every (\w+)", s.text):
                want = next(g for g in m.groups() if g)
                if want in SHAPES:
                    assert set(ref.ann_ids) == {a for a in anns if shape[a] == want}
                    checked["all_shape"] += 1
            elif m := re.fullmatch(r"(?:all|the|every) (\w+) shapes?", s.text):
                if m.group(1) in COLOURS:
                    assert set(ref.ann_ids) == {a for a in anns if colour[a] == m.group(1)}
                    checked["all_colour"] += 1
                else:
                    assert set(ref.ann_ids) == set(anns)
            elif " and " in s.text:
                named = {tuple(p.replace("the ", "").split()) for p in s.text.split(" and ")}
                assert named == {(colour[a], shape[a]) for a in ref.ann_ids}
                checked["pair"] += 1
            elif ref.no_target:
                c = next((w for w in words if w in COLOURS), None)
                sh = next(w for w in words if w in SHAPES)
                size = next((w for w in words if w in ("big", "small")), None)
                if size is None:
                    assert not any(shape[a] == sh and (c is None or colour[a] == c) for a in anns), s.text
                    checked["absent"] += 1
            else:
                (a,) = ref.ann_ids
                assert shape[a] in words, s.text
                c = next((w for w in words if w in COLOURS), None)
                assert c is None or colour[a] == c, (s.text, colour[a])
                checked["single"] += 1
    assert checked["single"] > 20 and checked["absent"] > 5 and checked["pair"] + checked["all_shape"] > 3


def test_deterministic_by_seed(tmp_path):
    a = generate_grefcoco(tmp_path / "a", num_images=6, seed=7)
    b = generate_grefcoco(tmp_path / "b", num_images=6, seed=7)
    generate_grefcoco(tmp_path / "c", num_images=6, seed=8)
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8  # 6 images + 2 annotation files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    refs = lambda d: (d / "grefcoco" / "grefs(unc).json").read_text()  # noqa: E731
    assert refs(tmp_path / "a") != refs(tmp_path / "c")


def test_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate_grefcoco(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="min_size"):
        generate_grefcoco(tmp_path, num_images=1, min_size=200, max_size=100)


def test_cli_verb_writes_a_readable_dataset(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["synthetic", "--out", str(tmp_path / "ds"), "--num-images", "5", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    src = read_grefcoco(tmp_path / "ds")
    assert report["totals"]["images"] == len(src.images) == 5
    assert report["totals"]["refs"] == len(src.refs)
    assert main(["synthetic", "--out", str(tmp_path / "bad"), "--num-images", "0"]) == 2
    assert "num_images" in capsys.readouterr().err
