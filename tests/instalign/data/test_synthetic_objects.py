"""The held-out ``objects`` style: the release format, another vocabulary, relations, its no-target rate."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from instalign.data.readers import read_grefcoco, reference_problems
from instalign.data.synthetic import COLOURS, SHAPES, SIZES, SPLITS, generate_grefcoco
from instalign.data.synthetic_objects import OBJECT_COLOURS, OBJECT_SHAPES, generate_objects

#: Words that carry content in the quickstart's expressions.
QUICKSTART_WORDS = set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(SIZES)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    counts = generate_objects(root, num_images=60, seed=0)
    return root, counts, read_grefcoco(root)


def test_the_readers_see_what_was_written(generated):
    root, counts, src = generated
    assert reference_problems(src) == []
    assert sum(counts["images"].values()) == len(src.images) == 60 and all(counts["images"][s] for s in SPLITS)
    assert sum(counts["samples"].values()) == sum(len(r.sentences) for r in src.refs)
    assert sum(counts["no_target_samples"].values()) == sum(len(r.sentences) for r in src.refs if r.no_target)
    inst = json.loads((root / "grefcoco" / "instances.json").read_text())
    assert [c["name"] for c in inst["categories"]] == list(OBJECT_SHAPES)
    kinds = Counter("polygon" if isinstance(a["segmentation"], list) else
                    "rle_" + type(a["segmentation"]["counts"]).__name__ for a in inst["annotations"])
    assert kinds["polygon"] and kinds["rle_str"] and kinds["rle_list"]  # the same release quirks


def test_it_differs_from_the_quickstarts_set_in_what_matters(generated):
    _, counts, src = generated
    sentences = [s.text for r in src.refs for s in r.sentences]
    words = {w for t in sentences for w in t.split()}
    assert not words & QUICKSTART_WORDS  # another vocabulary
    assert {"striped", "plain"} & words and set(OBJECT_COLOURS) & words and set(OBJECT_SHAPES) & words
    relations = [t for t in sentences if re.search(r" (left of|right of|above|below) the ", t)]
    superlatives = [t for t in sentences if re.search(r"\b(largest|biggest|smallest|leftmost|rightmost|topmost)\b", t)]
    assert len(relations) > 10 and len(superlatives) > 10
    # relations with no object that satisfies them are hard negatives
    assert any(r.no_target and re.search(r" (left of|right of|above|below) ", s.text) for r in src.refs
               for s in r.sentences)
    objects = Counter(a.image_id for a in src.annotations.values())
    assert min(objects.values()) >= 3 and max(objects.values()) >= 6  # more objects per image
    sides = [v for im in src.images.values() for v in (im.width, im.height)]
    assert min(sides) >= 160 and max(sides) > 320  # other image sizes
    share = sum(counts["no_target_samples"].values()) / sum(counts["samples"].values())
    assert 0.20 <= share <= 0.35, share  # another no-target rate


def test_targets_are_exactly_what_the_words_select(generated):
    _, _, src = generated
    shape_of = {a.ann_id: OBJECT_SHAPES[a.category_id - 1] for a in src.annotations.values()}
    by_image: dict[int, list[int]] = {}
    for a in src.annotations.values():
        by_image.setdefault(a.image_id, []).append(a.ann_id)
    checked = Counter()
    for ref in src.refs:
        for s in ref.sentences:
            found = {sh: re.search(rf"\b{sh}(e?s)?\b", s.text) for sh in OBJECT_SHAPES}
            named = sorted((sh for sh in found if found[sh]), key=lambda sh: found[sh].start())  # in word order
            if m := re.fullmatch(r"(?:all|the|both) (\w+?)(?:es|s)", s.text):
                if m.group(1) in OBJECT_SHAPES:  # "all stars": every star of the image, nothing else
                    assert set(ref.ann_ids) == {a for a in by_image[ref.image_id] if shape_of[a] == m.group(1)}
                    checked["all"] += 1
            if ref.ann_ids and named and not re.search(r" (left of|right of|above|below) ", s.text):
                assert all(shape_of[a] == named[0] for a in ref.ann_ids), s.text
                checked["shape"] += 1
            if ref.ann_ids and re.search(r" (left of|right of|above|below) ", s.text):
                assert all(shape_of[a] == named[0] for a in ref.ann_ids), s.text  # the subject's shape
                checked["relation"] += 1
    assert checked["all"] > 5 and checked["shape"] > 50 and checked["relation"] > 3


def test_deterministic_and_apart_from_the_other_styles_seeds(tmp_path):
    a = generate_objects(tmp_path / "a", num_images=4, seed=7)
    assert a == generate_objects(tmp_path / "b", num_images=4, seed=7)
    for f in sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    generate_grefcoco(tmp_path / "shapes", num_images=4, seed=7)
    ours = np.asarray(Image.open(next((tmp_path / "a" / "images").rglob("*.jpg"))))
    theirs = np.asarray(Image.open(next((tmp_path / "shapes" / "images").rglob("*.jpg"))))
    assert ours.shape != theirs.shape or not np.array_equal(ours, theirs)
    with pytest.raises(ValueError, match="num_images"):
        generate_objects(tmp_path / "c", num_images=0)


def test_cli_writes_the_held_out_style(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["synthetic", "--style", "objects", "--out", str(tmp_path / "o"), "--num-images", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["style"] == "objects" and printed["totals"]["images"] == 3
    assert json.loads((tmp_path / "o" / "grefcoco" / "instances.json").read_text())["categories"][0]["name"] == "star"
