"""``instalign prepare``, driver side: check a release's records and group them into image tasks.

A reader (``instalign.data.readers``) returns the refs, annotations and images of a release;
:func:`plan_tasks` checks them against each other and turns every bad record into a
quarantine row (:func:`quarantine_record`, ``QUARANTINE_SCHEMA``) with a reason code —
``unknown_image``, ``missing_image_record``, ``missing_annotation``,
``annotation_image_mismatch``, ``unsafe_split``, ``path_escape``, ``invalid_file_name`` (a NUL
byte or an unencodable character: ``release_checks.file_name_problem``) — and a message naming the
record. The rest is grouped by ``(image, split)``, one *task* per image however many
expressions name it (``TASK_SCHEMA``), which ``pipelines.data.shards`` processes on Ray
workers. Nothing here touches an image file or Ray.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from instalign.data.masks import PLAIN_NUMBER_TYPES
from instalign.data.readers import gc_paused, reference_problems
from instalign.data.records import IMAGE_SCHEMA
from instalign.data.release_checks import file_name_problem, is_safe_split_name
from instalign.data.source import Annotation, GRESSource
from instalign.errors import InstAlignError
from pipelines.core.redaction import redact

#: One task per ``(image, split)``: where the image is, its annotated size, the target instances
#: of its refs and its samples (one per sentence). Built on the driver, read by the workers.
TASK_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("split", pa.string()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    # A segmentation of plain polygons (lists of JSON numbers, nearly all of COCO) travels as
    # ``polygons``, in Arrow: cheaper to build and to read than JSON text (~1 s each way at
    # 10,000 images). Anything else (an RLE dict, numpy scalars from a pickle, a malformed list
    # that a worker must quarantine) is ``segmentation``, JSON text; the other one is null.
    ("instances", pa.list_(pa.struct([("ann_id", pa.int64()), ("category_id", pa.int32()),
                                      ("polygons", pa.list_(pa.list_(pa.float64()))),
                                      ("segmentation", pa.string())]))),
    ("samples", IMAGE_SCHEMA.field("samples").type),
])


class PrepareError(InstAlignError, RuntimeError):
    """The inputs or the output location do not allow a (complete) prepare; the message says why.

    The one error of every ``pipelines.data.prepare*`` module (``pipelines.data.prepare`` re-exports it).
    """


def quarantine_record(*, dataset: str, split: str = "", image_id: int = -1, ref_id: int = -1, ann_id: int = -1,
                      reason: str, detail: str) -> dict[str, Any]:
    """One ``QUARANTINE_SCHEMA`` row; ``-1`` where the record is not about a ref/annotation/image."""
    return dict(dataset=dataset, split=split, image_id=int(image_id), ref_id=int(ref_id), ann_id=int(ann_id),
                reason=reason, detail=detail)


@gc_paused()  # millions of small objects, no cycle (readers.gc_paused)
def plan_tasks(source: GRESSource, splits: list[str] | None = None, *, image_root: str | os.PathLike[str] | None = None
               ) -> tuple[list[dict], list[dict], dict[str, int], int]:
    """Check refs/annotations against each other and group samples per ``(image, split)``.

    Args:
        source: what a reader returned.
        splits: only these splits (default: every split of the release with a safe name).
        image_root: image paths must stay inside it (``path_escape`` otherwise; a path that cannot
            name a file is ``invalid_file_name`` whatever the root); ``prepare_dataset``
            passes ``--root``. ``None`` skips that check (for sources built in code, not read).

    Returns:
        tasks: one dict per (image, split) in ``TASK_SCHEMA`` form, only the target instances.
        records: quarantine records found here.
        empty_refs: per split, refs released without sentences (valid; they yield no sample).
        dropped: samples (sentences) lost with the quarantined refs.
    """
    ds = source.dataset
    for s in splits or ():
        if not is_safe_split_name(s):
            raise PrepareError(f"{ds}: split name {s!r:.80} is not a safe directory name (letters, digits, "
                               f"'_', '.', '-'; not starting with '.'; at most 64 characters)")
    records: list[dict] = []
    available = [s for s in source.splits() if is_safe_split_name(s)]  # each name checked once, not per ref
    safe = set(available)
    unsafe = [r for r in source.refs if r.split not in safe]
    for ref in unsafe:  # whatever --splits says: no selection can name them, and the release is suspect
        records.append(quarantine_record(
            dataset=ds, image_id=ref.image_id, ref_id=ref.ref_id, reason="unsafe_split",
            detail=f"ref {ref.ref_id}: split {ref.split!r:.80} is not a safe directory name (letters, digits, '_', "
                   f"'.', '-'; not starting with '.'; at most 64 characters); drops {len(ref.sentences)} sample(s)"))
    if splits:
        unknown = sorted(set(splits) - safe)
        if unknown:
            raise PrepareError(f"{ds}: split(s) {unknown} not in the release; available: {available}")
    wanted = set(splits or available)
    for ann in source.annotations.values():
        if ann.image_id not in source.images:
            records.append(quarantine_record(dataset=ds, image_id=ann.image_id, ann_id=ann.ann_id, reason="unknown_image",
                                             detail=f"annotation {ann.ann_id} is on image {ann.image_id}, which the "
                                                    f"annotation file does not list"))
    # Keyed by (ref_id, image_id): the readers keep duplicate ref ids (ReLA only warns about them).
    split_of = {}
    for r in source.refs:
        split_of.setdefault((r.ref_id, r.image_id), r.split)
    bad_refs = set()
    for p in reference_problems(source):  # refs naming an unknown image or a missing/foreign annotation
        key = (p["ref_id"], p["image_id"])
        bad_refs.add(key)
        if split_of[key] in wanted:
            records.append(quarantine_record(dataset=ds, split=split_of[key], **p))
    groups: dict[tuple[int, str], dict] = {}
    empty_refs, dropped = Counter(), sum(len(r.sentences) for r in unsafe)
    for ref in source.refs:
        if ref.split not in wanted:
            continue
        if (ref.ref_id, ref.image_id) in bad_refs:
            dropped += len(ref.sentences)
            continue
        if not ref.sentences:
            empty_refs[ref.split] += 1  # released that way (gRefCOCO): yields no sample
            continue
        key = (ref.image_id, ref.split)
        if key not in groups:
            info = source.images[ref.image_id]
            groups[key] = dict(image_id=info.image_id, split=ref.split, path=info.path, width=info.width,
                               height=info.height, instances={}, samples=[])
        g = groups[key]
        for a in ref.ann_ids:
            if a not in g["instances"]:  # refs of one image name the same annotations again and again
                g["instances"][a] = _task_instance(source.annotations[a])
        for s in ref.sentences:
            g["samples"].append(dict(ref_id=ref.ref_id, sent_id=s.sent_id, text=s.text, ann_ids=list(ref.ann_ids),
                                     no_target=not ref.ann_ids))
    inside = None if image_root is None else os.path.join(os.path.abspath(image_root), "")
    tasks = []
    for key in sorted(groups):
        g = groups[key]
        problem = file_name_problem(g["path"])
        if problem is not None:  # os.stat would raise ValueError, Arrow UnicodeEncodeError: one image, not the run
            reason, why = "invalid_file_name", f"cannot name a file: {problem}"
        elif inside is not None and not os.path.abspath(g["path"]).startswith(inside):
            # Lexical (abspath normalises ``..``; symlinks are not resolved): an image folder
            # linked into the root is fine, a file_name of "/etc/passwd" or "../../x" is not.
            reason, why = "path_escape", f"is outside --root {inside[:-1]!r:.200} (an absolute or '..' file_name)"
        else:
            reason = None
        if reason is not None:
            dropped += len(g["samples"])
            records.append(quarantine_record(
                dataset=ds, split=g["split"], image_id=g["image_id"], reason=reason,
                detail=f"image {g['image_id']}: its file {g['path']!r:.200} {why}; "
                       f"drops {len({s['ref_id'] for s in g['samples']})} ref(s), {len(g['samples'])} sample(s)"))
            continue
        g["instances"] = [g["instances"][a] for a in sorted(g["instances"])]
        g["samples"].sort(key=lambda s: (s["ref_id"], s["sent_id"]))
        tasks.append(g)
    return tasks, records, dict(empty_refs), dropped


def _task_instance(ann: Annotation) -> dict:
    """One ``TASK_SCHEMA`` instance: plain polygons as ``polygons``, any other segmentation as JSON."""
    seg = ann.segmentation
    if type(seg) is list and seg and all(type(p) is list and PLAIN_NUMBER_TYPES.issuperset(map(type, p)) for p in seg):
        return dict(ann_id=ann.ann_id, category_id=ann.category_id, polygons=seg, segmentation=None)
    return dict(ann_id=ann.ann_id, category_id=ann.category_id, polygons=None,
                segmentation=json.dumps(seg, default=_jsonable))


def task_segmentation(instance: dict) -> Any:
    """The segmentation of a task instance, as the release gave it (see ``TASK_SCHEMA``)."""
    polygons = instance["polygons"]
    return polygons if polygons is not None else json.loads(instance["segmentation"])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes):  # compressed RLE counts read from a pickle
        return obj.decode("ascii")
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable in a segmentation: {type(obj).__name__}")


def to_task_table(tasks: list[dict], root: str) -> pa.Table:
    """The tasks as Arrow, built on the driver: a value the schema cannot hold is a one-line
    error here, not an ``OverflowError`` inside a running cluster."""
    try:
        return pa.Table.from_pylist(tasks, schema=TASK_SCHEMA)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        raise PrepareError(f"{redact(str(root))}: a record does not fit the dataset schema "
                           f"({type(e).__name__}: {e})") from e


#: ``source_info``'s bounds: a release's file decides how big its ``info`` block is; the
#: manifest (and the MLflow dataset profile made from it) keep a few short entries.
_SOURCE_INFO_KEYS = 16
_SOURCE_INFO_KEY_CHARS = 64
_SOURCE_INFO_CHARS = 200
#: A string longer than this is no description: skipped rather than redacted and cut.
_SOURCE_INFO_READ_CHARS = 10_000


def manifest_source_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """The release's COCO ``info`` block as the manifest keeps it (``source_info``).

    Why: it says what the release is (``instalign.data.synthetic`` writes its description
    there, and ``pipelines.data.lineage`` names a synthetic dataset by it). Kept small and
    safe to record: its first 16 entries whose key is a string and whose value is a str, an
    int (64-bit) or a finite float; strings redacted (``pipelines.core.redaction``), keys cut
    at 64 characters and values at 200; nested values, and strings over 10,000 characters,
    left out.
    """
    out: dict[str, Any] = {}
    for key, value in info.items():
        if len(out) == _SOURCE_INFO_KEYS:
            break
        if not isinstance(key, str) or len(key) > _SOURCE_INFO_READ_CHARS:
            continue
        if type(value) is str:
            if len(value) > _SOURCE_INFO_READ_CHARS:
                continue
            value = redact(value)[:_SOURCE_INFO_CHARS]
        elif not (type(value) is int and -2 ** 63 <= value < 2 ** 63 or type(value) is float and math.isfinite(value)):
            continue
        out[redact(key)[:_SOURCE_INFO_KEY_CHARS]] = value
    return out
