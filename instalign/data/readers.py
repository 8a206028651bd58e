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
quarantine: split names that are not safe directory names (:func:`is_safe_split_name`),
image ``file_name``\\ s that are absolute or climb out of the image directory, and those that
cannot name a file at all (a NUL byte, a lone surrogate: :func:`file_name_problem`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, Iterator

from instalign.data.safe_pickle import PickleReadError, safe_load
from instalign.data.source import Annotation, GRESSource, ImageInfo, Ref, Sentence

logger = logging.getLogger(__name__)

__all__ = [
    "SourceFormatError",
    "read_grefcoco",
    "read_refzom",
    "read_refcoco",
    "read_source",
    "ReleaseFiles",
    "locate_release",
    "read_release",
    "gc_paused",
    "reference_problems",
    "is_safe_split_name",
    "DATASETS",
]

DATASETS = ("grefcoco", "refzom", "refcoco", "refcoco+", "refcocog")
REFCOCO_SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
COCO_TRAIN2014 = "COCO_train2014_{:012d}.jpg"

#: Split names become directory names under ``prepare --out``: one path component, no leading
#: dot (so never ``.``/``..`` or hidden), no separator, at most 64 characters.
_SAFE_SPLIT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}\Z")
#: Signed ranges of the Arrow columns the ints end up in (``instalign.data.records``).
_INT_RANGE = {64: (-(1 << 63), (1 << 63) - 1), 32: (-(1 << 31), (1 << 31) - 1)}
#: Containers below a segmentation's top level: 1 for COCO's shapes (polygons in a list; counts
#: and size in an RLE dict). 2 is admitted so plausible mistakes (polygons of ``[x, y]`` pairs,
#: a list of RLE dicts) reach prepare's per-annotation quarantine; deeper is not a
#: segmentation, and nesting thousands deep would only exhaust the recursion limit downstream.
_SEGMENTATION_DEPTH = 2


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 2, 60, 60, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 6


def _brief(value: Any) -> str:
    """A short repr of a value from a release file, for messages: bounded in length and depth
    (a plain ``repr`` of a list nested 100 000 deep, which a pickle can carry, recurses out)."""
    return _BRIEF.repr(value)


def is_safe_split_name(name: object) -> bool:
    """Whether ``name`` can be a split directory: ``[A-Za-z0-9_][A-Za-z0-9_.-]*``, ≤ 64 chars."""
    return isinstance(name, str) and _SAFE_SPLIT.match(name) is not None


def file_name_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file at all (``None`` when it can), for ``prepare`` to quarantine.

    A NUL byte (``os.stat`` raises ``ValueError``), or a character that neither UTF-8 (the
    Parquet string columns) nor the filesystem encoding can represent — a lone surrogate from
    a JSON ``"\\ud800"`` escape — would otherwise fail the whole run instead of one image.
    """
    if "\0" in path:
        return "it holds a NUL byte"
    for encode in (lambda p: p.encode("utf-8"), os.fsencode):
        try:
            encode(path)
        except UnicodeEncodeError as e:
            return f"its character {path[e.start]!r} cannot be encoded ({e.encoding}: {e.reason})"
    return None


class SourceFormatError(ValueError):
    """A release file is malformed; the message names the file, the record and the problem."""


# --------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require_file(path: Path, what: str, override: str) -> Path:
    if not path.is_file():  # follows symlinks: a link to /dev/zero or a FIFO is refused here, unread
        if path.exists():
            raise SourceFormatError(f"{what} {path} is not a regular file (a directory, FIFO or device)")
        raise FileNotFoundError(f"{what} not found: {path} (pass {override}= to point at it)")
    return path


def _load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise SourceFormatError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise SourceFormatError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason})") from exc
    except RecursionError:
        raise SourceFormatError(f"{path}: JSON nested too deeply to be a release file (Python's parser gave up "
                                f"at its recursion limit)") from None
    except ValueError as exc:  # e.g. an int literal of more than 4300 digits
        raise SourceFormatError(f"{path}: not valid JSON ({exc})") from exc


def _load_refs(path: Path) -> Any:
    if path.suffix == ".p":
        try:
            return safe_load(path)
        except PickleReadError as exc:
            raise SourceFormatError(str(exc)) from exc
    return _load_json(path)


def _checksum_key(path: Path, root: Path) -> str:
    # Paths relative to the root keep manifests comparable across machines.
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


# ------------------------------------------------------------------- field checks
class _Record:
    """Typed access to one JSON/pickle record; every error names file and record."""

    def __init__(self, path: Path, where: str, raw: Any):
        if not isinstance(raw, dict):
            raise SourceFormatError(f"{path}: {where} must be an object/dict, got {type(raw).__name__}")
        self.path, self.where, self.raw = path, where, raw

    def fail(self, msg: str) -> SourceFormatError:
        return SourceFormatError(f"{self.path}: {self.where}: {msg}")

    def get(self, key: str, check: Callable[[Any], bool], expected: str, *, default: Any = ...) -> Any:
        if key not in self.raw:
            if default is not ...:
                return default
            raise self.fail(f"missing key '{key}'")
        value = self.raw[key]
        if not check(value):
            raise self.fail(f"key '{key}' must be {expected}, got {type(value).__name__} {_brief(value)}")
        return value

    def integer(self, key: str, *, bits: int = 64, **kw: Any) -> int:
        """An int that fits the ``bits``-bit signed column it is stored in."""
        value = self.raw.get(key)
        if type(value) is int:  # the common case, inline: a release holds millions of these
            lo, hi = _INT_RANGE[bits]
            if lo <= value <= hi:
                return value
        return self.in_range(key, self.get(key, _is_int, "an int", **kw), bits)

    def in_range(self, key: str, value: Any, bits: int = 64) -> Any:
        """``value`` (an int, a list of ints or None) after checking every int fits ``bits`` bits."""
        lo, hi = _INT_RANGE[bits]
        values = () if value is None else _as_list(value)
        if values and lo <= min(values) and max(values) <= hi:
            return value
        for v in values:
            if not lo <= v <= hi:
                shown = v if v.bit_length() <= 256 else f"an int of {v.bit_length()} bits"
                raise self.fail(f"key '{key}' holds {shown}, outside the signed {bits}-bit range it is stored in")
        return value

    def string(self, key: str, **kw: Any) -> str:
        return self.get(key, lambda v: isinstance(v, str), "a string", **kw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_int_or_int_list(v: Any) -> bool:
    if type(v) is list and _INT_ONLY.issuperset(map(type, v)):  # JSON's case, in C (bool is not int here)
        return True
    return _is_int(v) or (isinstance(v, (list, tuple)) and all(_is_int(x) for x in v))


def _as_list(v: int | list[int]) -> list[int]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


_SCALARS = frozenset((int, float, str, bool, bytes, type(None)))
_INT_ONLY = frozenset((int,))


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of lists/tuples/dicts in ``value``, counted iteratively and at most ``limit``."""
    if not isinstance(value, (list, tuple, dict)):
        return 0
    depth, level = 0, [value]
    while depth < limit:
        nested = []
        for v in level:
            children = v.values() if isinstance(v, dict) else v
            if not _SCALARS.issuperset(map(type, children)):  # a polygon's floats are passed over in C
                nested += [c for c in children if isinstance(c, (list, tuple, dict))]
        if not nested:
            return depth
        level = nested
        depth += 1
    return depth


# ---------------------------------------------------------------- instances.json
def _read_instances(path: Path, image_dir: Path, *, need_file_name: bool
                    ) -> tuple[dict[int, ImageInfo], dict[int, Annotation], set[int]]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise SourceFormatError(f"{path}: top level must be a COCO object with 'images' and 'annotations', "
                                f"got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise SourceFormatError(f"{path}: key '{key}' must be a list, got "
                                    f"{'nothing' if key not in data else type(data[key]).__name__}")
    images: dict[int, ImageInfo] = {}
    for i, raw in enumerate(data["images"]):
        rec = _Record(path, f"images[{i}]", raw)
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
        rec = _Record(path, f"annotations[{i}]", raw)
        ann_id = rec.integer("id")
        seg = rec.get("segmentation", lambda v: isinstance(v, (list, dict)), "a polygon list or an RLE dict")
        if _depth(seg, _SEGMENTATION_DEPTH + 1) > _SEGMENTATION_DEPTH:
            raise rec.fail(f"key 'segmentation' is nested more than {_SEGMENTATION_DEPTH + 1} levels deep: "
                           f"neither a polygon list nor an RLE dict")
        if ann_id in annotations:
            raise rec.fail(f"duplicate annotation id {ann_id}")
        annotations[ann_id] = Annotation(ann_id=ann_id, image_id=rec.integer("image_id"),
                                         category_id=rec.integer("category_id", bits=32), segmentation=seg)
        if rec.get("iscrowd", lambda v: v in (0, 1), "0 or 1", default=0):
            crowd.add(ann_id)
    return images, annotations, crowd


# ----------------------------------------------------------------------- refs
def _sentences(rec: _Record) -> tuple[Sentence, ...]:
    raw = rec.get("sentences", lambda v: isinstance(v, (list, tuple)), "a list", default=[])
    out = []
    lo, hi = _INT_RANGE[64]
    for j, s in enumerate(raw):
        if type(s) is dict:  # the common case, inline: a non-empty 'raw' and an int id
            text, sent_id = s.get("raw"), s.get("sent_id")
            if type(text) is str and type(sent_id) is int and lo <= sent_id <= hi:
                text = text.strip()
                if text:
                    out.append(Sentence(sent_id=sent_id, text=text))
                    continue
        srec = _Record(rec.path, f"{rec.where}.sentences[{j}]", s)
        text = srec.get("raw", _is_text_or_none, "a string", default=None)
        if not text or not text.strip():
            text = srec.get("sent", _is_text_or_none, "a string", default=None)
        if text is None or not text.strip():
            raise srec.fail("no text: neither 'raw' nor 'sent' is a non-empty string")
        out.append(Sentence(sent_id=srec.integer("sent_id"), text=text.strip()))
    return tuple(out)


def _parse_refs(path: Path, data: Any, targets: Callable[[_Record, list[int] | None], tuple[int, ...]],
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
        rec = _Record(path, f"ref #{i}", raw)
        ref_id = rec.integer("ref_id")
        rec.where = f"ref #{i} (ref_id={ref_id})"
        ann = rec.in_range("ann_id", rec.get("ann_id", _is_int_or_int_list, "an int or a list of ints", default=None))
        rec.in_range("category_id", rec.get("category_id", _is_int_or_int_list, "an int or a list of ints",
                                            default=None), bits=32)
        # A repeated id would become two identical ground-truth instances: keep the first.
        ann_ids = tuple(dict.fromkeys(targets(rec, None if ann is None else _as_list(ann))))
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


def _grefcoco_targets(disagree: list[int]) -> Callable[[_Record, list[int] | None], tuple[int, ...]]:
    def targets(rec: _Record, ann: list[int] | None) -> tuple[int, ...]:
        if ann is None:
            raise rec.fail("missing key 'ann_id'")
        flag = rec.get("no_target", lambda v: isinstance(v, bool), "a bool", default=None)
        if -1 in ann and ann != [-1]:
            raise rec.fail(f"ann_id {_brief(ann)} mixes -1 (no target) with annotation ids")
        ids = () if ann == [-1] else tuple(ann)
        if not ids and ann != [-1]:
            raise rec.fail("ann_id is an empty list (no target is written [-1])")
        if flag is not None and flag != (not ids):
            disagree.append(int(rec.raw["ref_id"]))
        return ids
    return targets


def _refzom_targets(rec: _Record, ann: list[int] | None) -> tuple[int, ...]:
    if rec.string("source") == "zero":
        return ()
    if not ann or -1 in ann:
        raise rec.fail(f"ann_id {_brief(ann)} names no annotation but source is {_brief(rec.raw['source'])}, not 'zero'")
    return tuple(ann)


def _refcoco_targets(rec: _Record, ann: list[int] | None) -> tuple[int, ...]:
    if not ann or -1 in ann:
        raise rec.fail(f"ann_id {_brief(ann)}: RefCOCO refs always have a target")
    return tuple(ann)


# --------------------------------------------------------------------- readers
@dataclasses.dataclass(frozen=True)
class ReleaseFiles:
    """Where one release's annotation files and images are: located and checked to be
    regular files, not yet read (:func:`locate_release`)."""

    dataset: str
    root: Path
    refs: Path
    instances: Path
    images: Path


#: Per dataset: its folder under the root, its refs file name (``{split_by}`` filled in) and its image folder.
_LAYOUT = {
    "grefcoco": ("grefcoco", "grefs({split_by}).json", "train2014"),
    "refzom": ("ref-zom", "refs(final).p", "trainval2014"),
    **{name: (name, "refs({split_by}).p", "train2014") for name in REFCOCO_SPLIT_BYS},
}
_TITLE = {"grefcoco": "gRefCOCO", "refzom": "Ref-ZOM"}


def locate_release(dataset: str, root: str | os.PathLike[str], *, split_by: str | None = None,
                   refs_file: str | os.PathLike[str] | None = None,
                   instances_file: str | os.PathLike[str] | None = None,
                   image_dir: str | os.PathLike[str] | None = None) -> ReleaseFiles:
    """The release's files under ``root`` (or where the overrides point), without reading them.

    Cheap (a few ``stat`` calls): ``prepare`` calls it before anything else, so that a wrong
    ``--root`` is refused at once; parsing the files is the expensive part.

    Raises:
        FileNotFoundError: a file is missing (the message names the override that points at it).
        SourceFormatError: a file is a directory, FIFO or device.
        ValueError: an unknown dataset, or a split scheme the dataset is not released in.
    """
    if dataset not in _LAYOUT:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if dataset == "grefcoco":
        split_by = split_by or "unc"
    elif dataset in REFCOCO_SPLIT_BYS:
        split_by = split_by or REFCOCO_SPLIT_BYS[dataset][0]
        if split_by not in REFCOCO_SPLIT_BYS[dataset]:
            raise ValueError(f"{dataset} is released split by {REFCOCO_SPLIT_BYS[dataset]}, not {split_by!r}")
    root = Path(root)
    folder, refs_name, images = _LAYOUT[dataset]
    if refs_file is None:
        refs_file = root / folder / refs_name.format(split_by=split_by)
        pickle_path = refs_file.with_suffix(".p")
        if dataset == "grefcoco" and not refs_file.is_file() and pickle_path.is_file():
            refs_file = pickle_path  # gRefCOCO's refs come as JSON, or as the pickle of older copies
    title = _TITLE.get(dataset, dataset)
    return ReleaseFiles(
        dataset=dataset, root=root,
        refs=_require_file(Path(refs_file), f"{title} refs file", "refs_file"),
        instances=_require_file(Path(instances_file or root / folder / "instances.json"), f"{title} instances file",
                                "instances_file"),
        images=Path(image_dir or root / "images" / images))


def _finish(files: ReleaseFiles, images: dict, annotations: dict, refs: list[Ref]) -> GRESSource:
    checksums = {_checksum_key(p, files.root): _sha256(p) for p in (files.refs, files.instances)}
    logger.info("%s: %d refs, %d images, %d annotations", files.dataset, len(refs), len(images), len(annotations))
    return GRESSource(dataset=files.dataset, images=images, annotations=annotations, refs=refs, checksums=checksums)


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
    images, annotations, crowd = _read_instances(files.instances, files.images,
                                                 need_file_name=files.dataset == "refzom")
    if files.dataset == "grefcoco":
        disagree: list[int] = []
        refs = _parse_refs(files.refs, _load_refs(files.refs), _grefcoco_targets(disagree), crowd)
        if disagree:
            logger.warning("%s: %d ref(s) whose 'no_target' flag disagrees with ann_id; ann_id wins, e.g. ref_id %s",
                           files.refs, len(disagree), disagree[:5])
    else:
        targets = _refzom_targets if files.dataset == "refzom" else _refcoco_targets
        refs = _parse_refs(files.refs, _load_refs(files.refs), targets, crowd)
    return _finish(files, images, annotations, refs)


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
    """Dispatch on ``dataset`` (one of :data:`DATASETS`); ``paths`` are the layout overrides."""
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
