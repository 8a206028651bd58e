"""Readers for the official releases → :class:`GRESSource` (DESIGN §3).

Each reader takes the release as it is on disk, validates its *structure* (JSON/pickle
readable, keys present, types right) and raises :class:`SourceFormatError` naming the file,
the record and what is wrong. *Referential* problems — a ref naming an image or annotation
that is not in ``instances.json`` — are left in the source for ``prepare`` to quarantine
record by record (see :func:`reference_problems`), so one bad ref never sinks a release.

Default layouts (every path can be overridden with ``refs_file=``, ``instances_file=``,
``image_dir=``; relative overrides are taken as given, i.e. relative to the working dir):

* gRefCOCO (ReLA's ``G_REFER``)::

    <root>/grefcoco/grefs(unc).json      (or grefs(unc).p, read safely, as G_REFER does)
    <root>/grefcoco/instances.json
    <root>/images/train2014/COCO_train2014_%012d.jpg

* Ref-ZOM (DMMI's release; its README merges COCO train2014 and val2014 into one folder)::

    <root>/ref-zom/refs(final).p         (a pickle, read with the restricted unpickler)
    <root>/ref-zom/instances.json
    <root>/images/trainval2014/<images[].file_name from instances.json>

* RefCOCO / RefCOCO+ / RefCOCOg (lichengunc/refer)::

    <root>/<dataset>/refs(<split_by>).p   (unc | google | umd)
    <root>/<dataset>/instances.json
    <root>/images/train2014/<images[].file_name>

Release quirks handled, and the rules chosen where the release is ambiguous:

* ``ann_id`` is an int or a list; gRefCOCO's ``[-1]`` (or ``-1``) means *no target*;
  ``-1`` mixed with real ids is malformed.
* gRefCOCO's ``no_target`` flag is redundant with ``[-1]``. When they disagree,
  **``ann_id`` wins**: it is what ReLA's loader and official evaluation build the ground
  truth from (``no_target`` is never read there), and a ref with real ids has real masks.
  Disagreements are counted and logged.
* Ref-ZOM marks no-target refs with ``source == 'zero'`` (its ``ann_id`` is then ignored).
* A ref's ``file_name`` (``COCO_train2014_000000581857_16.jpg``) is *not* an image file:
  images are keyed by ``image_id`` through ``instances.json`` (``file_name`` there, else the
  COCO pattern).
* Refs with no ``sentences`` (empty or missing) are kept; they yield no samples.
* Sentence text is ``raw`` (what ReLA/LAVT tokenise), else ``sent``.
* Crowd annotations are dropped from a ref's targets, as ReLA's loader does — unless that
  would leave a targeted ref with none, in which case they are kept (logged), so a ref
  never silently turns into a no-target sample.
* Duplicate ``ref_id``\\ s (ReLA only prints a warning for them) are kept and logged; an id
  repeated inside one ``ann_id`` list is kept once.

Hostile or broken files (issue 11) end in a :class:`SourceFormatError` naming the file and the
record, never in a bare ``RecursionError`` or ``OverflowError``: JSON nested too deeply to
parse, ints outside the range the Parquet schema stores (ids are int64, sizes and category
ids int32 — checked here, before any worker starts), a segmentation nested deeper than a
polygon list. What the readers keep but ``prepare`` must not trust is left for it to
quarantine: split names that are not safe directory names (``release_checks.is_safe_split_name``),
image ``file_name``\\ s that are absolute or climb out of the image directory, and those that
cannot name a file at all (a NUL byte, a lone surrogate: ``release_checks.file_name_problem``).

Parts: ``release_files`` (where the files are: :func:`~instalign.data.release_files.locate_release`,
how they are opened, their checksums), ``release_checks`` (typed access to one record, the
error, the name checks); this module parses the records into a ``GRESSource``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from instalign.data.release_checks import (INT_RANGE, Record, SourceFormatError, as_list, brief, is_int_or_int_list,
                                           is_text_or_none, nesting_depth)
from instalign.data.release_files import (COCO_TRAIN2014, REFCOCO_SPLIT_BYS, ReleaseFiles, load_json,
                                          load_refs, locate_release, release_checksums)
from instalign.data.source import Annotation, GRESSource, ImageInfo, Ref, Sentence

logger = logging.getLogger(__name__)

__all__ = [
    "SourceFormatError",
    "read_grefcoco",
    "read_refzom",
    "read_refcoco",
    "read_source",
    "read_release",
    "gc_paused",
    "reference_problems",
]

#: Containers below a segmentation's top level: 1 for COCO's shapes (polygons in a list; counts
#: and size in an RLE dict). 2 is admitted so plausible mistakes (polygons of ``[x, y]`` pairs,
#: a list of RLE dicts) reach prepare's per-annotation quarantine; deeper is not a
#: segmentation, and nesting thousands deep would only exhaust the recursion limit downstream.
_SEGMENTATION_DEPTH = 2


# ---------------------------------------------------------------- instances.json
def _read_instances(path: Path, image_dir: Path, *, need_file_name: bool
                    ) -> tuple[dict[int, ImageInfo], dict[int, Annotation], set[int], dict[str, Any]]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: top level must be a COCO object with 'images' and 'annotations', "
                                f"got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise SourceFormatError(f"{path}: key '{key}' must be a list, got "
                                    f"{'nothing' if key not in data else type(data[key]).__name__}")
    images: dict[int, ImageInfo] = {}
    for i, raw in enumerate(data["images"]):
        rec = Record(path, f"images[{i}]", raw)
        image_id = rec.integer("id")
        width, height = rec.integer("width", bits=32), rec.integer("height", bits=32)
        if width <= 0 or height <= 0:
            raise rec.fail(f"image {image_id} has size {width}x{height}")
        if need_file_name:
            file_name = rec.string("file_name")
        else:
            file_name = rec.string("file_name", default=None) or COCO_TRAIN2014.format(image_id)
        if image_id in images:
            raise rec.fail(f"duplicate image id {image_id}")
        images[image_id] = ImageInfo(image_id=image_id, path=str(image_dir / file_name), width=width, height=height)
    annotations: dict[int, Annotation] = {}
    crowd: set[int] = set()
    for i, raw in enumerate(data["annotations"]):
        rec = Record(path, f"annotations[{i}]", raw)
        ann_id = rec.integer("id")
        seg = rec.get("segmentation", lambda v: isinstance(v, (list, dict)), "a polygon list or an RLE dict")
        if nesting_depth(seg, _SEGMENTATION_DEPTH + 1) > _SEGMENTATION_DEPTH:
            raise rec.fail(f"key 'segmentation' is nested more than {_SEGMENTATION_DEPTH + 1} levels deep: "
                           f"neither a polygon list nor an RLE dict")
        if ann_id in annotations:
            raise rec.fail(f"duplicate annotation id {ann_id}")
        annotations[ann_id] = Annotation(ann_id=ann_id, image_id=rec.integer("image_id"),
                                         category_id=rec.integer("category_id", bits=32), segmentation=seg)
        if rec.get("iscrowd", lambda v: v in (0, 1), "0 or 1", default=0):
            crowd.add(ann_id)
    # COCO's ``info`` is descriptive only: kept when it is a mapping, never a reason to refuse a release.
    info = data.get("info")
    return images, annotations, crowd, dict(info) if isinstance(info, dict) else {}


# ----------------------------------------------------------------------- refs
def _sentences(rec: Record) -> tuple[Sentence, ...]:
    raw = rec.get("sentences", lambda v: isinstance(v, (list, tuple)), "a list", default=[])
    out = []
    lo, hi = INT_RANGE[64]
    for j, s in enumerate(raw):
        if type(s) is dict:  # the common case, inline: a non-empty 'raw' and an int id
            text, sent_id = s.get("raw"), s.get("sent_id")
            if type(text) is str and type(sent_id) is int and lo <= sent_id <= hi:
                text = text.strip()
                if text:
                    out.append(Sentence(sent_id=sent_id, text=text))
                    continue
        srec = Record(rec.path, f"{rec.where}.sentences[{j}]", s)
        text = srec.get("raw", is_text_or_none, "a string", default=None)
        if not text or not text.strip():
            text = srec.get("sent", is_text_or_none, "a string", default=None)
        if text is None or not text.strip():
            raise srec.fail("no text: neither 'raw' nor 'sent' is a non-empty string")
        out.append(Sentence(sent_id=srec.integer("sent_id"), text=text.strip()))
    return tuple(out)


def _parse_refs(path: Path, data: Any, targets: Callable[[Record, list[int] | None], tuple[int, ...]],
                crowd: set[int]) -> list[Ref]:
    if isinstance(data, dict) and isinstance(data.get("refs"), list):
        data = data["refs"]  # some re-exports wrap the list
    if not isinstance(data, list):
        raise SourceFormatError(f"{path}: must hold a list of refs, got {type(data).__name__}")
    refs: list[Ref] = []
    seen: set[int] = set()
    dup: list[int] = []
    crowd_kept: list[int] = []
    for i, raw in enumerate(data):
        rec = Record(path, f"ref #{i}", raw)
        ref_id = rec.integer("ref_id")
        rec.where = f"ref #{i} (ref_id={ref_id})"
        ann = rec.in_range("ann_id", rec.get("ann_id", is_int_or_int_list, "an int or a list of ints", default=None))
        rec.in_range("category_id", rec.get("category_id", is_int_or_int_list, "an int or a list of ints",
                                            default=None), bits=32)
        # A repeated id would become two identical ground-truth instances: keep the first.
        ann_ids = tuple(dict.fromkeys(targets(rec, None if ann is None else as_list(ann))))
        non_crowd = tuple(a for a in ann_ids if a not in crowd)
        if len(non_crowd) < len(ann_ids):
            if non_crowd:
                ann_ids = non_crowd
            else:
                crowd_kept.append(ref_id)
        if ref_id in seen:
            dup.append(ref_id)
        seen.add(ref_id)
        refs.append(Ref(ref_id=ref_id, image_id=rec.integer("image_id"), split=rec.string("split"),
                        ann_ids=ann_ids, sentences=_sentences(rec), no_target=not ann_ids))
    if dup:
        logger.warning("%s: %d duplicate ref_id(s) kept, e.g. %s", path, len(dup), dup[:5])
    if crowd_kept:
        logger.warning("%s: %d ref(s) refer only to crowd annotations; kept as targets, e.g. ref_id %s",
                       path, len(crowd_kept), crowd_kept[:5])
    return refs


def _grefcoco_targets(disagree: list[int]) -> Callable[[Record, list[int] | None], tuple[int, ...]]:
    def targets(rec: Record, ann: list[int] | None) -> tuple[int, ...]:
        if ann is None:
            raise rec.fail("missing key 'ann_id'")
        flag = rec.get("no_target", lambda v: isinstance(v, bool), "a bool", default=None)
        if -1 in ann and ann != [-1]:
            raise rec.fail(f"ann_id {brief(ann)} mixes -1 (no target) with annotation ids")
        ids = () if ann == [-1] else tuple(ann)
        if not ids and ann != [-1]:
            raise rec.fail("ann_id is an empty list (no target is written [-1])")
        if flag is not None and flag != (not ids):
            disagree.append(int(rec.raw["ref_id"]))
        return ids
    return targets


def _refzom_targets(rec: Record, ann: list[int] | None) -> tuple[int, ...]:
    if rec.string("source") == "zero":
        return ()
    if not ann or -1 in ann:
        raise rec.fail(f"ann_id {brief(ann)} names no annotation but source is {brief(rec.raw['source'])}, not 'zero'")
    return tuple(ann)


def _refcoco_targets(rec: Record, ann: list[int] | None) -> tuple[int, ...]:
    if not ann or -1 in ann:
        raise rec.fail(f"ann_id {brief(ann)}: RefCOCO refs always have a target")
    return tuple(ann)


# --------------------------------------------------------------------- readers
def _finish(files: ReleaseFiles, images: dict, annotations: dict, refs: list[Ref],
            info: dict[str, Any]) -> GRESSource:
    checksums = release_checksums(files)
    logger.info("%s: %d refs, %d images, %d annotations", files.dataset, len(refs), len(images), len(annotations))
    return GRESSource(dataset=files.dataset, images=images, annotations=annotations, refs=refs, checksums=checksums,
                      info=info)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cycle collector off while a release becomes millions of Python objects.

    Parsing allocates the annotations' polygons, the refs and their sentences — millions of
    containers, none of them in a reference cycle — and every collection of the oldest
    generation walks all of those alive so far, so the collections grow with the release.
    Measured at 10,000 COCO-sized images: reading took 3.9-4.1 s with the collector, 1.7 s
    without; ``prepare``'s planning 0.9-1.3 s against 0.5 s. Reference counting still frees
    every object as before; the collector is switched back on (if it was on) when the block
    ends, however it ends. Usable as a decorator.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@gc_paused()
def read_release(files: ReleaseFiles) -> GRESSource:
    """Parse and check the located release (layout and quirks in the module docstring)."""
    images, annotations, crowd, info = _read_instances(files.instances, files.images,
                                                       need_file_name=files.dataset == "refzom")
    if files.dataset == "grefcoco":
        disagree: list[int] = []
        refs = _parse_refs(files.refs, load_refs(files.refs), _grefcoco_targets(disagree), crowd)
        if disagree:
            logger.warning("%s: %d ref(s) whose 'no_target' flag disagrees with ann_id; ann_id wins, e.g. ref_id %s",
                           files.refs, len(disagree), disagree[:5])
    else:
        targets = _refzom_targets if files.dataset == "refzom" else _refcoco_targets
        refs = _parse_refs(files.refs, load_refs(files.refs), targets, crowd)
    return _finish(files, images, annotations, refs, info)


def read_grefcoco(root: str | os.PathLike[str], *, refs_file: str | os.PathLike[str] | None = None,
                  instances_file: str | os.PathLike[str] | None = None,
                  image_dir: str | os.PathLike[str] | None = None, split_by: str = "unc") -> GRESSource:
    """gRefCOCO as released by ReLA (layout and quirks in the module docstring)."""
    return read_release(locate_release("grefcoco", root, split_by=split_by, refs_file=refs_file,
                                       instances_file=instances_file, image_dir=image_dir))


def read_refzom(root: str | os.PathLike[str], *, refs_file: str | os.PathLike[str] | None = None,
                instances_file: str | os.PathLike[str] | None = None,
                image_dir: str | os.PathLike[str] | None = None) -> GRESSource:
    """Ref-ZOM (splits ``train``/``test``; ``source == 'zero'`` marks no-target refs)."""
    return read_release(locate_release("refzom", root, refs_file=refs_file, instances_file=instances_file,
                                       image_dir=image_dir))


def read_refcoco(root: str | os.PathLike[str], dataset: str = "refcoco", split_by: str = "unc", *,
                 refs_file: str | os.PathLike[str] | None = None,
                 instances_file: str | os.PathLike[str] | None = None,
                 image_dir: str | os.PathLike[str] | None = None) -> GRESSource:
    """Classic RefCOCO / RefCOCO+ / RefCOCOg (every ref has exactly its targets; no no-target)."""
    if dataset not in REFCOCO_SPLIT_BYS:
        raise ValueError(f"dataset must be one of {sorted(REFCOCO_SPLIT_BYS)}, got {dataset!r}")
    return read_release(locate_release(dataset, root, split_by=split_by, refs_file=refs_file,
                                       instances_file=instances_file, image_dir=image_dir))


def read_source(dataset: str, root: str | os.PathLike[str], *, split_by: str | None = None,
                **paths: Any) -> GRESSource:
    """Dispatch on ``dataset`` (one of ``release_files.DATASETS``); ``paths`` are the layout overrides."""
    return read_release(locate_release(dataset, root, split_by=split_by, **paths))


def reference_problems(source: GRESSource) -> list[dict[str, Any]]:
    """Refs that point at missing images/annotations, as quarantine-ready dicts.

    Keys follow ``records.QUARANTINE_SCHEMA`` (minus ``dataset``/``split``, which the caller
    has): ``image_id``, ``ref_id``, ``ann_id``, ``reason``, ``detail``.
    """
    problems = []
    for ref in source.refs:
        if ref.image_id not in source.images:
            problems.append(dict(image_id=ref.image_id, ref_id=ref.ref_id, ann_id=-1, reason="missing_image_record",
                                 detail=f"ref {ref.ref_id}: image {ref.image_id} is not in instances.json"))
            continue
        for a in ref.ann_ids:
            ann = source.annotations.get(a)
            if ann is None:
                problems.append(dict(image_id=ref.image_id, ref_id=ref.ref_id, ann_id=a, reason="missing_annotation",
                                     detail=f"ref {ref.ref_id}: annotation {a} is not in instances.json"))
            elif ann.image_id != ref.image_id:
                problems.append(dict(image_id=ref.image_id, ref_id=ref.ref_id, ann_id=a,
                                     reason="annotation_image_mismatch",
                                     detail=f"ref {ref.ref_id} (image {ref.image_id}): annotation {a} "
                                            f"belongs to image {ann.image_id}"))
    return problems
