"""Fuzz: release records and pickles (issue "no input that crashes", "nothing lost").

* **Records.** Start from the tiny official-format releases of ``fixtures_official`` (gRefCOCO:
  JSON refs; Ref-ZOM: a protocol-2 refs pickle; both with COCO ``instances.json``), apply 1-3
  edits anywhere in the refs or instances tree — delete a key, replace a value with junk
  (every JSON type, ints past int64, NaN and infinities, nested lists, NUL bytes, absolute
  and ``..`` file names; from a pickle also bytes, tuples, sets and NumPy scalars), add a junk
  key — then run what ``instalign prepare`` runs up to the shards, without Ray: the reader
  (``read_release``), the driver's checks (``plan_tasks``, ``to_task_table``) and each image
  task on the worker side (``prepare_shards.process_task``). Property: a clean
  ``SourceFormatError`` / ``PrepareError`` / ``UnsafePickleError`` naming the record, or a
  result whose image paths all stay under the release root and whose samples are all kept
  or counted as dropped; ``process_task`` never raises (its bad rows are quarantine records).
* **Pickles.** Byte-mutated pickles (protocols 0-5 of the refs, NumPy scalars, bytes, sets,
  and hostile ones calling ``os.mkdir``) through ``safe_pickle.safe_loads``: plain data or
  ``PickleReadError`` / ``UnsafePickleError``, and the hostile global never runs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fixtures_official import write_grefcoco, write_refzom
from tests.support.fuzz_support import fuzz_settings, run_case

LAYOUT = {"grefcoco": ("grefcoco", "grefs(unc).json", "train2014"),
          "refzom": ("ref-zom", "refs(final).p", "trainval2014")}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Both tiny releases on disk, and their pristine refs/instances as Python data."""
    root = tmp_path_factory.mktemp("fuzz_release")
    write_grefcoco(root)
    write_refzom(root)
    data = {}
    for ds, (folder, refs_name, _) in LAYOUT.items():
        refs_path = root / folder / refs_name
        refs = pickle.loads(refs_path.read_bytes()) if refs_path.suffix == ".p" else json.loads(refs_path.read_text())
        data[ds] = {"refs": refs, "instances": json.loads((root / folder / "instances.json").read_text())}
    return root, data


_HUGE = st.sampled_from([2**63, -(2**63) - 1, 2**31, -1, 0, 10**30, 2**64 + 1])
_ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5])
_NAMES = st.sampled_from(["../../../etc/passwd", "/etc/passwd", "a\x00b.jpg", "", ".", "..", "sub/../../x.jpg",
                          "x" * 300, "COCO_train2014_000000001001.jpg", "\u202e.jpg", "train/../..", "~"])
_SCALARS = st.none() | st.booleans() | st.integers() | _HUGE | st.floats() | _ODD_FLOATS | st.text(max_size=20) \
    | _NAMES
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
_DEEP = st.integers(3, 60).map(lambda n: _nest(n))
#: Only a pickle can carry these.
_PICKLE_ONLY = (st.binary(max_size=12) | st.tuples(_SCALARS, _SCALARS) | st.frozensets(st.integers(), max_size=3)
                | st.integers(-5, 5).map(np.int64) | _ODD_FLOATS.map(np.float32) | st.just(np.bool_(True)))


#: Junk aimed at one field: names that leave the directory, ids past the stored range.
_FIELD_JUNK = {"file_name": _NAMES | st.text(max_size=30), "split": _NAMES | st.text(max_size=30),
               "ref_id": _HUGE, "image_id": _HUGE, "id": _HUGE, "width": _HUGE, "sent_id": _HUGE,
               "category_id": _HUGE, "ann_id": _HUGE | st.lists(_HUGE, max_size=3)}


def _nest(depth: int):
    value: object = [1.0, 2.0]
    for _ in range(depth):
        value = [value]
    return value


def _junk(pickled: bool):
    return _JSON | _DEEP | _PICKLE_ONLY if pickled else _JSON | _DEEP


#: The fields a hostile release would aim at, per file (a random walk finds them too, rarely).
_TARGETED = {
    "refs": [(0, "split"), (1, "split"), (0, "ann_id"), (0, "image_id"), (0, "ref_id"), (0, "sentences"),
             (0, "sentences", 0, "raw"), (0, "sentences", 0, "sent_id"), (2, "source"), (0, "category_id")],
    "instances": [("images", 0, "file_name"), ("images", 1, "file_name"), ("images", 0, "width"),
                  ("images", 0, "id"), ("annotations", 0, "segmentation"), ("annotations", 1, "segmentation", "counts"),
                  ("annotations", 0, "segmentation", 0), ("annotations", 0, "image_id"), ("annotations", 0, "iscrowd"),
                  ("annotations", 0, "category_id")],
}


@st.composite
def edited_release(draw):
    """``(dataset, which file, edits)``; each edit is ``(path of keys/indices, op, value)``."""
    ds = draw(st.sampled_from(sorted(LAYOUT)))
    which = draw(st.sampled_from(("refs", "instances")))
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_TARGETED[which]) | st.lists(st.integers(0, 20) | st.sampled_from(
            ["images", "annotations", "file_name", "split", "ann_id", "sentences", "raw", "segmentation", "id",
             "image_id", "width", "height", "ref_id", "sent_id", "counts", "size", "iscrowd", "source"]),
            max_size=5).map(tuple))
        op = draw(st.sampled_from(("set", "set", "delete", "add_key")))
        junk = _junk(pickled=ds == "refzom" and which == "refs")
        field = next((step for step in reversed(path) if isinstance(step, str)), None)
        edits.append((tuple(path), op, draw(_FIELD_JUNK.get(field, junk) | junk)))
    return ds, which, edits


def _apply(tree, path, op, value):
    """Follow ``path`` as far as it leads (indices modulo the length, keys that exist), then edit there."""
    parent, key = None, None
    node = tree
    for step in path:
        if isinstance(node, list) and node:
            index = step % len(node) if isinstance(step, int) else 0
            parent, key, node = node, index, node[index]
        elif isinstance(node, dict) and node:
            k = step if step in node else sorted(node, key=str)[step % len(node)] if isinstance(step, int) else None
            if k is None:
                break
            parent, key, node = node, k, node[k]
        else:
            break
    if parent is None:
        return value if op == "set" else tree
    if op == "set":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif isinstance(node, dict):
        node[str(value)[:20]] = value
    return tree


def _copy(value):
    return pickle.loads(pickle.dumps(value))


def _samples(tasks) -> int:
    return sum(len(t["samples"]) for t in tasks)


def _prepare_without_ray(ds: str, refs_file: Path, instances_file: Path, image_dir: Path, root: Path):
    """What ``instalign prepare`` does to a release before writing shards, in this process."""
    from instalign.data.readers import read_release
    from instalign.data.release_files import locate_release
    from pipelines.data.records import plan_tasks, to_task_table
    from pipelines.data.shards import process_task

    source = read_release(locate_release(ds, root, refs_file=refs_file, instances_file=instances_file,
                                         image_dir=image_dir))
    tasks, records, _, dropped = plan_tasks(source, image_root=root)
    to_task_table(tasks, str(root))
    rows = [process_task(task, dataset=ds, image_max_side=32, jpeg_quality=80) for task in tasks]
    total = sum(len(r.sentences) for r in source.refs)
    return dict(tasks=tasks, records=records, dropped=dropped, total=total, rows=rows)


def _outside(root: Path):
    inside = os.path.join(os.path.abspath(root), "")

    def escaped(result) -> str | None:
        for task in result["tasks"]:
            if not os.path.abspath(task["path"]).startswith(inside):
                return f"task for image {task['image_id']} reads {task['path']!r}, outside {inside}"
        if _samples(result["tasks"]) + result["dropped"] != result["total"]:
            return (f"samples lost: {result['total']} in the release, {_samples(result['tasks'])} planned + "
                    f"{result['dropped']} dropped")
        return None
    return escaped


@fuzz_settings()
@given(case=edited_release())
@example(case=("grefcoco", "instances", [(("images", 0, "file_name"), "set", "a\x00b.jpg")]))
@example(case=("refzom", "refs", [((0, "split"), "set", "../../x"), ((1, "ann_id"), "set", [2**63])]))
def test_edited_release_is_read_and_quarantined_or_refused_in_one_line(release, case):
    from instalign.data.readers import SourceFormatError
    from instalign.data.safe_pickle import UnsafePickleError
    from pipelines.data.records import PrepareError

    root, pristine = release
    ds, which, edits = case
    folder, refs_name, images = LAYOUT[ds]
    tree = _copy(pristine[ds][which])
    for path, op, value in edits:
        tree = _apply(tree, path, op, value)
    work = Path(tempfile.mkdtemp(dir=root, prefix="case-"))
    try:
        refs_file, instances_file = work / refs_name, work / "instances.json"
        for name, target in (("refs", refs_file), ("instances", instances_file)):
            value = tree if name == which else pristine[ds][name]
            if target.suffix == ".p":
                target.write_bytes(pickle.dumps(value, protocol=2))
            else:
                target.write_text(json.dumps(value, allow_nan=True))
        run_case("release records: readers + plan_tasks + process_task", (ds, which, edits),
                 lambda: _prepare_without_ray(ds, refs_file, instances_file, root / "images" / images, root),
                 refusals=(SourceFormatError, PrepareError, UnsafePickleError), escaped=_outside(root))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- pickles ---------------------------------------------------------------------------------

_CANARY = Path(tempfile.gettempdir()) / f"instalign-fuzz-canary-{os.getpid()}"


class _Mkdir:
    """Pickles as ``os.mkdir(<canary>)``: what a hostile annotation pickle would run."""

    def __reduce__(self):
        return os.mkdir, (str(_CANARY),)


def _pickle_seeds() -> list[bytes]:
    refs = [{"ref_id": 1, "image_id": 2, "split": "train", "ann_id": [3, 4], "sentences": [{"raw": "a b", "sent_id": 5}],
             "file_name": "x.jpg", "source": "zero"}]
    seeds = [pickle.dumps(refs, protocol=p) for p in range(6)]
    seeds += [pickle.dumps({"ids": [np.int64(7), np.float32(0.5)], "raw": b"\xff\x00", "set": {1, 2}}, protocol=p)
              for p in (2, 4)]
    seeds += [pickle.dumps([_Mkdir()], protocol=p) for p in (0, 2, 4)]
    seeds.append(pickle.dumps(np.zeros(2, dtype=object), protocol=2))  # an object array: refused
    return seeds


PICKLES = _pickle_seeds()
_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, int, float, bool, type(None))


@st.composite
def mutated_pickles(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(PICKLES)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(("byte", "word", "insert", "delete", "truncate")))
        if op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "word":
            data[pos:pos + 4] = struct.pack("<I", draw(st.sampled_from((0, 1, 0x7FFFFFFF, 0xFFFFFFFF))))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"cos\nsystem\n", b"cbuiltins\neval\n", b"\x8c\x02os\x8c\x05mkdir\x93", b"R", b"(", b"]"]))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def _not_plain(value) -> str | None:
    """The first object in ``value`` that is not plain data (iterative: a pickle can nest deeply)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if type(v) not in _PLAIN:
            return f"a {type(v).__module__}.{type(v).__name__} came out of the pickle"
        if isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack += list(v)
    return None


@fuzz_settings()
@given(data=mutated_pickles())
@example(data=b"X\x01\x00\x00\x00\x80.")  # a BINUNICODE string that is not UTF-8
def test_mutated_pickle_is_plain_data_or_refused(data):
    from instalign.data.safe_pickle import PickleReadError, UnsafePickleError, safe_loads

    def escaped(result):
        if _CANARY.exists():
            return f"the pickle ran os.mkdir: {_CANARY} exists"
        return _not_plain(result)

    try:
        run_case("release pickles: safe_pickle.safe_loads", data, lambda: safe_loads(data, source="fuzz.p"),
                 refusals=(PickleReadError, UnsafePickleError), escaped=escaped)
    finally:
        if _CANARY.exists():
            _CANARY.rmdir()


def test_the_hostile_seed_would_run_under_plain_pickle():
    """The canary is real: ``pickle.loads`` of the hostile seed creates the directory."""
    try:
        pickle.loads(PICKLES[8])
        assert _CANARY.is_dir()
    finally:
        if _CANARY.exists():
            _CANARY.rmdir()
