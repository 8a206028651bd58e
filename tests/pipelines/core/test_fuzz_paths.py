"""Fuzz: names from outside that become paths (issue "nothing leaked").

* **Split names** (``release_checks.is_safe_split_name``): a split becomes a directory under
  ``prepare --out`` and a shard file name (``prepare_shards.shard_file_name``). For any
  string (separators, dots, NUL, Unicode, 1,000 characters) or non-string, the check answers
  without raising, and every name it admits joins to exactly one level under ``--out``.
* **Release split names and image file names through the driver** (``plan_tasks``): refs of
  a real tiny release get fuzzed splits and images fuzzed ``file_name``\\ s; every planned
  task has a safe split and an image path inside ``--root``, and every sample is planned or
  counted as dropped (quarantined).
* **Served image paths** (``serving.read_served_image_path``): paths built from ``..``,
  absolute paths, links out of the root, NUL, the root's own name, and arbitrary text give the
  bytes of a file inside the image root or the same 400 — never a byte from outside.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fixtures_official import write_grefcoco
from tests.support.fuzz_support import TALLY_PATH, fuzz_settings, run_case

_RISKY = st.sampled_from(["", ".", "..", "...", "/", "\\", "\x00", "train", "val", "-", "_", "~", ".hidden",
                          "a/b", "C:", "%2e%2e", "\u2024\u2024", "\u202e", "\n", " ", "x" * 64, "x" * 65])
_SPLITS = (st.text(max_size=80) | st.lists(_RISKY, max_size=4).map("".join)
           | st.text(alphabet="./\\\x00_-aZ9", max_size=12) | st.text(min_size=900, max_size=1000))


def _one_level_under(out: str, name: str) -> str | None:
    """How joining ``name`` under ``out`` (as a split dir, then a shard file) leaves one level, or None."""
    from pipelines.data.shards import shard_file_name

    for part in (name, shard_file_name(name, 3)):
        if "\x00" in part or os.sep in part or (os.altsep and os.altsep in part) or part in (".", ".."):
            return f"{part!r} is not a single path component"
    joined = os.path.normpath(os.path.join(out, name, shard_file_name(name, 3)))
    if os.path.dirname(os.path.dirname(joined)) != out:
        return f"{name!r} puts its shards at {joined!r}, not one level under {out!r}"
    return None


@fuzz_settings(default=200)
@given(name=_SPLITS | st.integers() | st.none() | st.binary(max_size=8))
def test_admitted_split_names_stay_one_level_under_out(name):
    from instalign.data.release_checks import is_safe_split_name

    out = "/data/prepared"

    def call():
        ok = is_safe_split_name(name)
        assert isinstance(ok, bool)
        return name if ok else None

    run_case("split names: release_checks.is_safe_split_name", name, call, refusals=(),
             escaped=lambda admitted: admitted is not None and _one_level_under(out, admitted))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny gRefCOCO release, read once; cases replace its splits and image paths."""
    from instalign.data.readers import read_grefcoco

    root = tmp_path_factory.mktemp("fuzz_paths_release")
    write_grefcoco(root)
    return root, read_grefcoco(root)


_FILE_NAMES = (st.sampled_from(["COCO_train2014_000000001001.jpg", "../../../etc/passwd", "/etc/passwd", "..",
                                "a\x00b.jpg", "sub/../../x.jpg", "images/../../x.jpg", "", ".", "//x.jpg",
                                "x" * 4000])
               | st.lists(_RISKY, min_size=1, max_size=5).map("/".join) | st.text(max_size=40))


@fuzz_settings()
@given(splits=st.lists(_SPLITS, min_size=9, max_size=9), file_names=st.lists(_FILE_NAMES, min_size=3, max_size=3))
def test_planned_tasks_keep_safe_splits_and_paths_inside_the_root(source, splits, file_names):
    from instalign.data.release_checks import is_safe_split_name
    from pipelines.data.records import PrepareError, plan_tasks

    root, pristine = source
    image_dir = root / "images" / "train2014"
    refs = [dataclasses.replace(r, split=splits[i % len(splits)]) for i, r in enumerate(pristine.refs)]
    images = {k: dataclasses.replace(info, path=str(image_dir / file_names[i % len(file_names)]))
              for i, (k, info) in enumerate(sorted(pristine.images.items()))}
    fuzzed = dataclasses.replace(pristine, refs=refs, images=images)
    inside = os.path.join(os.path.abspath(root), "")
    total = sum(len(r.sentences) for r in refs)

    def escaped(result) -> str | None:
        tasks, _, _, dropped = result
        for t in tasks:
            if not is_safe_split_name(t["split"]):
                return f"task of image {t['image_id']} has the unsafe split {t['split']!r}"
            if not os.path.abspath(t["path"]).startswith(inside):
                return f"task of image {t['image_id']} reads {t['path']!r}, outside {inside}"
        planned = sum(len(t["samples"]) for t in tasks)
        return None if planned + dropped == total else f"{total} samples: {planned} planned + {dropped} dropped"

    run_case("split and file names: prepare_records.plan_tasks", (splits, file_names),
             lambda: plan_tasks(fuzzed, image_root=root), refusals=(PrepareError,), escaped=escaped)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """An image root, its files' bytes, and what lies outside it (a secret file, /etc/passwd)."""
    base = tmp_path_factory.mktemp("fuzz_served")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"SECRET")
    (root / "photo.png").write_bytes(b"PHOTO")
    (root / "sub" / "nested.png").write_bytes(b"NESTED")
    (root / "outside_link").symlink_to(outside / "secret.png")
    (root / "outside_dir").symlink_to(outside, target_is_directory=True)
    (root / "passwd_link").symlink_to("/etc/passwd")
    (root / "inside_link").symlink_to(root / "photo.png")
    (base / "rootsibling").mkdir()  # same prefix as "root": a naive startswith check would admit it
    (base / "rootsibling" / "x.png").write_bytes(b"SIBLING")
    return root, {b"PHOTO", b"NESTED"}, base


def _served_paths(root: Path, base: Path):
    pieces = st.sampled_from(["..", ".", "", "sub", "photo.png", "nested.png", "outside_link", "outside_dir",
                              "secret.png", "passwd_link", "inside_link", "rootsibling", "x.png", "\x00", "%2e%2e",
                              "~", str(root), str(base), str(base / "outside"), "/etc/passwd", "root"])
    readable = st.sampled_from(["photo.png", "sub/nested.png", "inside_link", "sub/../photo.png", str(root / "photo.png")])
    return (readable | st.lists(pieces, min_size=1, max_size=6).map("/".join) | st.text(max_size=40)
            | st.integers() | st.none() | st.floats())


@fuzz_settings(default=150)
@given(data=st.data())
def test_served_image_path_never_reads_outside_the_root(image_root, data):
    from pipelines.models.limits import PyfuncInputError, read_served_image_path

    root, allowed, base = image_root
    value = data.draw(_served_paths(root, base), label="image_path")

    run_case("image_path: serving.read_served_image_path", value,
             lambda: read_served_image_path(0, value, root=str(root), max_bytes=1 << 20),
             refusals=(PyfuncInputError,), status=lambda e: e.get_http_status_code(), escaped=_no_file_under(allowed))


def _no_file_under(allowed: set[bytes]):
    def escaped(content: bytes) -> str | None:
        return None if content in allowed else f"read {content[:40]!r}, which is no file under the root"
    return escaped


@pytest.mark.skipif(bool(TALLY_PATH), reason="a tally counts cases instead of failing them")
def test_the_property_fails_for_a_reader_that_follows_links_out(image_root):
    """A control: the check above is not vacuous — a reader that joins and reads, following the
    link out of the root as a plain ``open`` does, is caught reading the secret."""
    root, allowed, _ = image_root
    with pytest.raises(AssertionError, match="escape .*SECRET"):
        run_case("control", "outside_link", lambda: (root / "outside_link").read_bytes(), refusals=(),
                 escaped=_no_file_under(allowed))
