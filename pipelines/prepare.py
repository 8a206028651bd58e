"""``instalign prepare``: an official release → sharded Parquet + manifest, on Ray Data (DESIGN §3).

The reader of the chosen dataset (``instalign.data.readers``) parses the refs and the COCO
annotations on the driver; this module checks them, groups the samples (one per sentence)
by ``(image, split)`` so that each image is stored once however many expressions name it,
one *task* row per image, and hands them to Ray Data in shards (below). Per task a worker
reads the image file, decodes it in full (a truncated JPEG fails here, not at training
time), optionally shrinks it, and rasterises each target annotation to COCO RLE at the
*stored* size.

Nothing is dropped silently. Every bad record becomes a row of the ``_quarantine`` table
(``QUARANTINE_SCHEMA``) with a reason code and a message naming the file/record; the
manifest counts them. Driver-side checks: ``unknown_image`` (an annotation on an image id
the annotation file does not list) and, from ``readers.reference_problems``,
``missing_image_record`` (a ref on such an image id), ``missing_annotation`` (a ref naming
an annotation id that does not exist), ``annotation_image_mismatch`` (a ref naming an
annotation of another image); ``unsafe_split`` (a ref whose split name could not be a
directory under ``--out``: ``../../escaped``) and ``path_escape`` (an image whose
``file_name`` is absolute or climbs out of ``--root``). Worker-side, per row inside a
``try``: ``missing_image``, ``not_regular_file`` (a FIFO, a device such as a link to
``/dev/zero``, a directory — refused unread), ``image_too_large`` (over the byte cap, or a
header claiming more pixels than the pixel cap: decompression bombs), ``corrupt_image``
(undecodable or truncated), ``image_size_mismatch`` (file size differs from the annotation
file, so the polygons would not line up), ``invalid_segmentation``, ``invalid_target`` (a
ref dropped because one of its annotations was invalid) and ``unexpected_error``. Ray's
``max_errored_blocks`` is never used: it drops whole blocks with no count (PLATFORM-FACTS,
Ray Data).

Release files are not trusted to steer paths (issue 11): split names must pass
``readers.is_safe_split_name`` before they become directories, image paths must stay inside
``--root`` (checked lexically: symlinked image folders keep working), and only regular
files are read, up to ``max_image_bytes``; decoding is refused above ``max_image_pixels``.

One streaming pass (issue 16). The unit of work is a *shard*: up to ``rows_per_shard``
consecutive image tasks of one split, which become exactly one Parquet file
``out/<split>/<split>-NNNNN.parquet``. The task table (Arrow, built on the driver) is put in
the object store once; ``ray.data.range(number of groups)`` feeds groups of consecutive
shards (:func:`group_shards`, ~8 Ray tasks per CPU: a task's fixed cost is ~85 ms here) to
a ``map_batches`` UDF (:func:`write_shards`) that looks their rows up in that table,
processes each image, writes each shard's file and returns one small statistics row per
shard (counts and the shard's quarantine records). Image bytes therefore never enter the object store: nothing is
materialised, nothing spills, however large the release (``tests/test_prepare_streaming.py``:
~117 MB of images through an 80 MiB object store), and each image is decoded once.
The driver streams the statistics rows back (``iter_batches``) and builds the counts, the
quarantine and the manifest from them. Ray Data's own writers do not fit the layout:
``write_parquet(partition_cols=["split"])`` names folders ``split=train`` and drops the
``split`` column, and a write task fed by ``min_rows_per_file`` buffering mixes splits.

Memory per Ray worker (one CPU each) is bounded by one shard: its stored image bytes
(``rows_per_shard`` × ~160 KB for COCO-sized JPEGs: ~40 MB at the default 256), its Arrow
table and Parquet encoding buffers (about as much again), plus one decoded image at a time
(~1 MB for COCO; at most ``max_image_pixels`` × 3 bytes, 150 MB at the default cap).

Ray starts while the driver plans: the release is read and validated first (an unreadable
or hostile release fails without starting Ray), then ``init_ray`` runs in the main thread —
Ray 2.60 started from another thread makes the process exit at its first ``ray.put``
(measured) — while a helper thread checks the records, groups them by image and builds the
task table. ``--strict`` with a record quarantined on the driver therefore fails after Ray
has started, but before any task runs; one quarantined by a worker fails the run after the
pass, and the shards already written are removed.

Images are stored as the source bytes when the source is a JPEG that needs no resizing
(no second lossy generation, no encode cost), otherwise re-encoded as RGB JPEG at
``jpeg_quality``. ``image_max_side=0`` keeps the released size; the model's plain resize
to 480×480 (ReLA) happens in the loader, so any stored size ≥ 480 loses nothing.
``_manifest.json`` is written last and atomically: no manifest ⇔ not a finished dataset.

``overwrite`` never destroys before it builds: the new dataset is written to a hidden sibling
(``.<name>.prepare-<hex>`` beside ``--out``) and swapped in only once its manifest is written;
a prepare that fails (``--strict`` with a bad source, a crash, Ctrl-C) removes the sibling
and leaves the old dataset as it was. Locally the swap is two renames; object stores have no
rename, so there the old prefix is deleted and the new one copied in, manifest last. The
manifest records the command line and the source root redacted (``pipelines.redaction``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as _dt
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from instalign.data.images import DEFAULT_MAX_IMAGE_BYTES
from instalign.data.readers import is_safe_split_name, read_source, reference_problems
from instalign.data.records import IMAGE_SCHEMA, MANIFEST_NAME, QUARANTINE_DIR, QUARANTINE_SCHEMA, SCHEMA_VERSION
from instalign.data.safe_pickle import UnsafePickleError
from instalign.data.source import GRESSource
from pipelines.redaction import command_line, redact

log = logging.getLogger("instalign.prepare")

DATASETS = ("grefcoco", "refzom", "refcoco", "refcoco+", "refcocog")
#: Decoded-pixel cap per image: 50 M pixels (150 MB as RGB) is an 8K photograph; COCO's largest
#: image has 0.4 M. A header claiming more is ``image_too_large`` before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

#: What a shard task returns to the driver: one row per shard, no image bytes.
STATS_SCHEMA = pa.schema([
    ("shard", pa.int64()),  # position in the driver's shard plan
    ("split", pa.string()),
    ("file", pa.string()),  # the shard's file name under out/<split>/; "" when no image row was kept
    ("images", pa.int64()),
    ("refs", pa.int64()),
    ("samples", pa.int64()),
    ("no_target_samples", pa.int64()),
    ("multi_target_samples", pa.int64()),
    ("dropped_samples", pa.int64()),  # samples lost with the shard's quarantined records
    ("quarantine", pa.string()),  # JSON list of QUARANTINE_SCHEMA records
])

TASK_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("split", pa.string()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("instances", pa.list_(pa.struct([("ann_id", pa.int64()), ("category_id", pa.int32()),
                                      ("segmentation", pa.string())]))),  # JSON: polygons and RLE differ in type
    ("samples", IMAGE_SCHEMA.field("samples").type),
])


class PrepareError(RuntimeError):
    """The inputs or the output location do not allow a (complete) prepare; the message says why."""


def quarantine_record(*, dataset: str, split: str = "", image_id: int = -1, ref_id: int = -1, ann_id: int = -1,
                      reason: str, detail: str) -> dict[str, Any]:
    """One ``QUARANTINE_SCHEMA`` row; ``-1`` where the record is not about a ref/annotation/image."""
    return dict(dataset=dataset, split=split, image_id=int(image_id), ref_id=int(ref_id), ann_id=int(ann_id),
                reason=reason, detail=detail)


# --- driver side: read, check, group ------------------------------------------------------

def plan_tasks(source: GRESSource, splits: list[str] | None = None, *, image_root: str | os.PathLike[str] | None = None
               ) -> tuple[list[dict], list[dict], dict[str, int], int]:
    """Check refs/annotations against each other and group samples per ``(image, split)``.

    Args:
        source: what a reader returned.
        splits: only these splits (default: every split of the release with a safe name).
        image_root: image paths must stay inside it (``path_escape`` otherwise); ``prepare_dataset``
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
    unsafe = [r for r in source.refs if not is_safe_split_name(r.split)]
    for ref in unsafe:  # whatever --splits says: no selection can name them, and the release is suspect
        records.append(quarantine_record(
            dataset=ds, image_id=ref.image_id, ref_id=ref.ref_id, reason="unsafe_split",
            detail=f"ref {ref.ref_id}: split {ref.split!r:.80} is not a safe directory name (letters, digits, '_', "
                   f"'.', '-'; not starting with '.'; at most 64 characters); drops {len(ref.sentences)} sample(s)"))
    available = sorted({r.split for r in source.refs if is_safe_split_name(r.split)})
    if splits:
        unknown = sorted(set(splits) - set(available))
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
            ann = source.annotations[a]
            g["instances"][a] = dict(ann_id=a, category_id=ann.category_id, segmentation=json.dumps(ann.segmentation, default=_jsonable))
        for s in ref.sentences:
            g["samples"].append(dict(ref_id=ref.ref_id, sent_id=s.sent_id, text=s.text, ann_ids=list(ref.ann_ids),
                                     no_target=not ref.ann_ids))
    inside = None if image_root is None else os.path.join(os.path.abspath(image_root), "")
    tasks = []
    for key in sorted(groups):
        g = groups[key]
        if inside is not None and not os.path.abspath(g["path"]).startswith(inside):
            # Lexical (abspath normalises ``..``; symlinks are not resolved): an image folder
            # linked into the root is fine, a file_name of "/etc/passwd" or "../../x" is not.
            refs = {s["ref_id"] for s in g["samples"]}
            dropped += len(g["samples"])
            records.append(quarantine_record(
                dataset=ds, split=g["split"], image_id=g["image_id"], reason="path_escape",
                detail=f"image {g['image_id']}: its file {g['path']!r:.200} is outside --root {inside[:-1]!r:.200} "
                       f"(an absolute or '..' file_name); drops {len(refs)} ref(s), {len(g['samples'])} sample(s)"))
            continue
        g["instances"] = [g["instances"][a] for a in sorted(g["instances"])]
        g["samples"].sort(key=lambda s: (s["ref_id"], s["sent_id"]))
        tasks.append(g)
    return tasks, records, dict(empty_refs), dropped


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes):  # compressed RLE counts read from a pickle
        return obj.decode("ascii")
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable in a segmentation: {type(obj).__name__}")


# --- worker side: one image row ------------------------------------------------------------

def _stored_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    if max_side <= 0 or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _rasterise(segmentation: Any, *, height: int, width: int, out_h: int, out_w: int) -> str:
    """COCO segmentation at the annotated size → compressed RLE counts at the stored size.

    Polygons are scaled and rasterised at the stored size (exact); an RLE is decoded and
    resized with nearest neighbour (its pixels are all there is).
    """
    from instalign.data.masks import resize_rle, segmentation_to_rle

    if (out_h, out_w) != (height, width) and isinstance(segmentation, list):
        sx, sy = out_w / width, out_h / height
        segmentation = [[v * (sx if i % 2 == 0 else sy) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                         for i, v in enumerate(poly)] if isinstance(poly, list) else poly for poly in segmentation]
        return segmentation_to_rle(segmentation, out_h, out_w)["counts"]
    counts = segmentation_to_rle(segmentation, height, width)["counts"]
    return resize_rle(counts, (height, width), (out_h, out_w))


def process_task(task: dict, *, dataset: str, image_max_side: int, jpeg_quality: int,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[dict, list[dict]]:
    """One task row → (image row with the ``_EXTRA`` columns, quarantine records)."""
    from PIL import Image

    from instalign.data.images import (CorruptImageError, ImageTooLargeError, NotARegularFileError, decode_image,
                                       encode_jpeg, read_image_size, read_regular_file)

    image_id, split, path = int(task["image_id"]), task["split"], task["path"]
    width, height = int(task["width"]), int(task["height"])
    samples = list(task["samples"])
    where = dict(dataset=dataset, split=split, image_id=image_id)
    lost = f"drops {len({s['ref_id'] for s in samples})} ref(s), {len(samples)} sample(s)"
    row = dict(image_id=image_id, dataset=dataset, split=split, orig_width=width, orig_height=height, width=0,
               height=0, image=b"", instances=[], samples=[], _keep=False, _refs=0, _samples=0,
               _no_target_samples=0, _multi_target_samples=0, _dropped_samples=len(samples))
    try:
        data = read_regular_file(path, max_bytes=max_image_bytes)  # no FIFO wait, no endless /dev/zero
    except NotARegularFileError as e:
        return row, [quarantine_record(**where, reason="not_regular_file", detail=f"image {image_id}: {e}; {lost}")]
    except ImageTooLargeError as e:
        return row, [quarantine_record(**where, reason="image_too_large", detail=f"image {image_id}: {e}; {lost}")]
    except OSError as e:
        return row, [quarantine_record(**where, reason="missing_image", detail=f"image {image_id}: cannot read "
                                       f"{path}: {e}; {lost}")]
    out_w, out_h = _stored_size(width, height, image_max_side)
    try:
        size = read_image_size(data, source=path, max_pixels=max_image_pixels)  # bombs stop at the header
        # Full decode even when the bytes are kept: truncation must surface now, not in training.
        img = decode_image(data, source=path, draft_size=(out_w, out_h) if (out_w, out_h) != size else None,
                           max_pixels=max_image_pixels)
    except ImageTooLargeError as e:
        return row, [quarantine_record(**where, reason="image_too_large", detail=f"image {image_id}: {e}; {lost}")]
    except CorruptImageError as e:
        return row, [quarantine_record(**where, reason="corrupt_image", detail=f"image {image_id}: {e}; {lost}")]
    if size != (width, height):
        return row, [quarantine_record(**where, reason="image_size_mismatch",
                                       detail=f"image {image_id} ({path}) is {size[0]}×{size[1]} but the "
                                              f"annotation file says {width}×{height}; {lost}")]
    if (out_w, out_h) == (width, height) and data[:3] == b"\xff\xd8\xff":
        encoded = data  # already a JPEG at the stored size: no second lossy generation
    else:
        if img.size != (out_w, out_h):
            img = img.resize((out_w, out_h), Image.BILINEAR, reducing_gap=3.0)  # antialiased when shrinking
        encoded = encode_jpeg(img, quality=jpeg_quality)

    records, instances, bad = [], [], set()
    for inst in task["instances"]:
        try:
            rle = _rasterise(json.loads(inst["segmentation"]), height=height, width=width, out_h=out_h, out_w=out_w)
        except Exception as e:  # noqa: BLE001 - pycocotools raises bare Exceptions/TypeErrors
            bad.add(inst["ann_id"])
            records.append(quarantine_record(**where, ann_id=inst["ann_id"], reason="invalid_segmentation",
                                             detail=f"annotation {inst['ann_id']} (image {image_id}): cannot "
                                                    f"rasterise its segmentation: {type(e).__name__}: {e}"))
            continue
        instances.append(dict(ann_id=inst["ann_id"], category_id=inst["category_id"], rle=rle))
    kept, dropped_refs = [], {}
    for s in samples:
        hit = sorted(bad.intersection(s["ann_ids"]))
        if hit:
            dropped_refs.setdefault(s["ref_id"], hit)
        else:
            kept.append(s)
    for ref_id, hit in dropped_refs.items():
        records.append(quarantine_record(**where, ref_id=ref_id, ann_id=hit[0], reason="invalid_target",
                                         detail=f"ref {ref_id} dropped: its annotation(s) {hit} are invalid"))
    used = {a for s in kept for a in s["ann_ids"]}
    row.update(width=out_w, height=out_h, image=encoded, instances=[i for i in instances if i["ann_id"] in used],
               samples=kept, _keep=bool(kept), _refs=len({s["ref_id"] for s in kept}), _samples=len(kept),
               _no_target_samples=sum(1 for s in kept if s["no_target"]),
               _multi_target_samples=sum(1 for s in kept if len(s["ann_ids"]) > 1),
               _dropped_samples=len(samples) - len(kept))
    return row, records


def process_task_safely(task: dict, *, dataset: str, **options: Any) -> tuple[dict, list[dict]]:
    """:func:`process_task` that never raises for a bad row: any other exception is a bug, and
    a bug must not kill a multi-hour job — the image is quarantined as ``unexpected_error``."""
    try:
        return process_task(task, dataset=dataset, **options)
    except Exception as e:  # noqa: BLE001 - quarantined and counted, never silent
        row = dict(image_id=task["image_id"], split=task["split"], _keep=False, _refs=0, _samples=0,
                   _no_target_samples=0, _multi_target_samples=0, _dropped_samples=len(task["samples"]))
        return row, [quarantine_record(dataset=dataset, split=task["split"], image_id=task["image_id"],
                                       reason="unexpected_error",
                                       detail=f"image {task['image_id']} ({task['path']}): {type(e).__name__}: {e}")]


def shard_file_name(split: str, index: int) -> str:
    """``train-00003.parquet``: the ``index``-th shard of ``split`` (stable across runs and retries)."""
    return f"{split}-{index:05d}.parquet"


def write_shard(tasks: list[dict], *, split: str, index: int, fs: pafs.FileSystem, out_path: str, dataset: str,
                **options: Any) -> dict:
    """Process one shard's image tasks and write its kept rows as one Parquet file.

    Returns its ``STATS_SCHEMA`` row. Deterministic: a retried task rewrites the same file
    with the same content. Memory: the shard's stored images, one decoded image at a time.
    """
    kept, records = [], []
    stats = dict(split=split, file="", images=0, refs=0, samples=0, no_target_samples=0, multi_target_samples=0,
                 dropped_samples=0)
    for task in tasks:
        row, found = process_task_safely(task, dataset=dataset, **options)
        records += found
        stats["dropped_samples"] += row["_dropped_samples"]
        if row["_keep"]:
            kept.append({k: row[k] for k in IMAGE_SCHEMA.names})
            stats["images"] += 1
            for key in ("refs", "samples", "no_target_samples", "multi_target_samples"):
                stats[key] += row[f"_{key}"]
    if kept:
        stats["file"] = shard_file_name(split, index)
        table = pa.Table.from_pylist(kept, schema=IMAGE_SCHEMA)  # the schema's metadata carries its version
        with fs.open_output_stream(f"{out_path}/{split}/{stats['file']}") as f:
            pq.write_table(table, f)
    stats["quarantine"] = json.dumps(records)
    return stats


def write_shards(batch: dict[str, np.ndarray], *, tasks: Any, shards: list[tuple[str, int, int, int]],
                 groups: list[tuple[int, int]], **kwargs: Any) -> pa.Table:
    """Ray Data UDF over ``ray.data.range(len(groups))``: group indices → the statistics rows
    of their shards.

    ``tasks`` is the ``ObjectRef`` of the whole task table (Arrow: read zero-copy from the
    node's object store); ``shards[i]`` is ``(split, index in split, first row, end row)``;
    group ``g`` is the shards ``range(*groups[g])``, processed one after the other (memory:
    one shard). ``kwargs`` are :func:`write_shard`'s.
    """
    import ray

    table = ray.get(tasks)
    out = []
    for g in batch["id"]:
        for i in range(*groups[int(g)]):
            split, index, start, stop = shards[i]
            stats = write_shard(table.slice(start, stop - start).to_pylist(), split=split, index=index, **kwargs)
            out.append(dict(stats, shard=i))
    return pa.Table.from_pylist(out, schema=STATS_SCHEMA)


# --- output location ----------------------------------------------------------------------

def resolve_output(out: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (s3://, gs://, file://) → (pyarrow filesystem, path in it)."""
    if "://" in str(out):
        return pafs.FileSystem.from_uri(str(out))
    return pafs.LocalFileSystem(), os.path.abspath(str(out))


def check_output(fs: pafs.FileSystem, path: str, *, overwrite: bool) -> bool:
    """Refuse to mix with an existing dataset unless ``overwrite``.

    Returns whether ``path`` holds something that a finished prepare must *replace*; nothing
    is deleted here (``overwrite`` builds beside it, see :func:`replace_output`).
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type != pafs.FileType.Directory:
        raise PrepareError(f"output {path} exists and is not a directory")
    present = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    if not present:
        return False
    if not overwrite:
        what = "a finished dataset (_manifest.json)" if any(p.base_name == MANIFEST_NAME for p in present) \
            else f"{len(present)} file(s) from an earlier (possibly interrupted) run"
        raise PrepareError(f"output {path} already holds {what}; pass --overwrite (overwrite=True) to replace it")
    return True


def sibling_path(path: str, tag: str) -> str:
    """``<parent>/.<name>.<tag>-<hex>``: a hidden neighbour of ``path`` on the same filesystem
    (so that a local swap is a rename, never a copy across devices)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if not parent or not name:
        raise PrepareError(f"output {path} has no parent to build a replacement beside; use a sub-directory")
    return f"{parent}/.{name}.{tag}-{uuid.uuid4().hex[:12]}"


def _copy_tree_manifest_last(fs: pafs.FileSystem, src: str, dst: str) -> None:
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.type == pafs.FileType.File]
    for f in sorted(files, key=lambda p: p.rsplit("/", 1)[-1] == MANIFEST_NAME):  # the manifest goes last
        target = dst + f[len(src):]
        fs.create_dir(target.rpartition("/")[0], recursive=True)
        fs.copy_file(f, target)


def replace_output(fs: pafs.FileSystem, built: str, path: str) -> None:
    """Put the finished dataset at ``built`` in place of the old one at ``path``.

    Local filesystems: rename the old one aside, rename the new one in (rolled back if that
    fails), delete the old one. Object stores (no rename): delete the old prefix, copy the new
    one in with the manifest last — an interruption there leaves ``path`` without a manifest
    (an unfinished dataset, by definition) and the complete build at ``built``, which the
    error names.
    """
    if fs.type_name == "local":
        old = sibling_path(path, "replaced")
        fs.move(path, old)
        try:
            fs.move(built, path)
        except BaseException:
            fs.move(old, path)
            raise
        fs.delete_dir(old)
        return
    fs.delete_dir(path)
    try:
        _copy_tree_manifest_last(fs, built, path)
    except Exception as e:
        raise PrepareError(f"replacing {path}: copying the new dataset in failed ({type(e).__name__}: {e}); the "
                           f"complete new dataset is at {built}, the old one is gone") from e
    fs.delete_dir(built)


def write_manifest(fs: pafs.FileSystem, path: str, manifest: dict) -> None:
    """Write ``_manifest.json`` atomically: a temporary name renamed into place (local);
    a single object PUT on object stores, which is atomic there."""
    text = json.dumps(manifest, indent=2, sort_keys=False).encode()
    final = f"{path}/{MANIFEST_NAME}"
    if fs.type_name != "local":
        with fs.open_output_stream(final) as f:
            f.write(text)
        return
    tmp = f"{path}/.{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(text)
        fs.move(tmp, final)  # os.rename: atomic on POSIX
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


# --- the driver -----------------------------------------------------------------------------

def _format_records(records: list[dict], n: int = 5) -> str:
    lines = [f"  [{r['reason']}] {r['detail']}" for r in records[:n]]
    if len(records) > n:
        lines.append(f"  ... and {len(records) - n} more")
    return "\n".join(lines)


def _task_table(tasks: list[dict], root: str) -> pa.Table:
    """The tasks as Arrow, built on the driver: a value the schema cannot hold is a one-line
    error here, not an ``OverflowError`` inside a running cluster."""
    try:
        return pa.Table.from_pylist(tasks, schema=TASK_SCHEMA)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        raise PrepareError(f"{redact(str(root))}: a record does not fit the dataset schema "
                           f"({type(e).__name__}: {e})") from e


def plan_shards(tasks: list[dict], rows_per_shard: int) -> tuple[list[dict], list[tuple[str, int, int, int]]]:
    """Order the tasks by ``(split, image_id)`` and cut each split into shards.

    Returns the ordered tasks and one ``(split, index in split, first row, end row)`` per
    shard: up to ``rows_per_shard`` images of one split, which become one Parquet file.
    """
    ordered = sorted(tasks, key=lambda t: (t["split"], t["image_id"]))
    shards, start = [], 0
    while start < len(ordered):
        split = ordered[start]["split"]
        end = start
        while end < len(ordered) and ordered[end]["split"] == split:
            end += 1
        for index, first in enumerate(range(start, end, rows_per_shard)):
            shards.append((split, index, first, min(first + rows_per_shard, end)))
        start = end
    return ordered, shards


#: Ray tasks per CPU in the pass. Each task costs ~85 ms beyond its work (measured on 2 cores:
#: 313 one-shard tasks of 32 images took 0.17 s each, half of it outside the UDF), so shards are
#: grouped into about this many tasks per CPU: few enough to make that negligible, enough to
#: balance the cores at the end.
TASKS_PER_CPU = 8


def group_shards(num_shards: int, cpus: int, tasks_per_cpu: int = TASKS_PER_CPU) -> list[tuple[int, int]]:
    """Consecutive shard ranges ``(first, end)``, one per Ray task: ``tasks_per_cpu × cpus`` of
    them (fewer when there are fewer shards), as equal as the shard count allows."""
    n = max(1, min(num_shards, tasks_per_cpu * cpus))
    bounds = [round(i * num_shards / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


@dataclasses.dataclass
class _Plan:
    """What the driver works out from the release while Ray starts."""

    records: list[dict]  # quarantined on the driver
    empty_refs: dict[str, int]
    dropped: int  # samples lost with the driver's quarantined records
    task_table: pa.Table  # ordered as ``shards`` expects
    shards: list[tuple[str, int, int, int]]


def _plan(source: GRESSource, *, splits: list[str] | None, root: str, strict: bool, rows_per_shard: int) -> _Plan:
    tasks, records, empty_refs, dropped = plan_tasks(source, splits, image_root=root)
    log.info("%s: %d refs, %d annotations, %d images read; %d image rows to process, %d record(s) quarantined "
             "while checking", source.dataset, len(source.refs), len(source.annotations), len(source.images),
             len(tasks), len(records))
    if strict and records:
        raise PrepareError(f"--strict: {len(records)} bad record(s) in {redact(str(root))}:\n"
                           f"{_format_records(records)}")
    if not tasks:
        raise PrepareError(f"{source.dataset} at {redact(str(root))}: no sample to write (no ref with sentences in "
                           f"splits {splits})")
    ordered, shards = plan_shards(tasks, rows_per_shard)
    return _Plan(records, dict(empty_refs), dropped, _task_table(ordered, root), shards)


def _run_pass(plan: _Plan, *, fs: pafs.FileSystem, out_path: str, dataset: str, **options: Any) -> list[dict]:
    """The one Ray Data pass: every shard processed and written once; returns the statistics rows,
    in shard order."""
    import ray
    import ray.data

    for split in sorted({s[0] for s in plan.shards}):
        if not is_safe_split_name(split):  # plan_tasks admits none; this line is what keeps writes inside out
            raise PrepareError(f"refusing to write split {split!r:.80}: not a safe directory name")
        fs.create_dir(f"{out_path}/{split}", recursive=True)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if len(plan.shards) < 2 * cpus:
        log.info("%d shard(s) for %d CPUs: a shard is the unit of work, so a smaller --rows-per-shard would use "
                 "the cores better", len(plan.shards), cpus)
    groups = group_shards(len(plan.shards), cpus)
    tasks = ray.put(plan.task_table)  # once; every task reads its rows from it
    stats = (ray.data.range(len(groups), override_num_blocks=len(groups))
             .map_batches(write_shards, batch_size=None, batch_format="numpy", num_cpus=1,
                          fn_kwargs=dict(tasks=tasks, shards=plan.shards, groups=groups, fs=fs, out_path=out_path,
                                         dataset=dataset, **options)))
    rows = [r for batch in stats.iter_batches(batch_size=None, batch_format="pyarrow") for r in batch.to_pylist()]
    return sorted(rows, key=lambda r: r["shard"])


def prepare_dataset(*, dataset: str, root: str, out: str, image_max_side: int = 0, jpeg_quality: int = 90,
                    rows_per_shard: int = 256, splits: list[str] | None = None, strict: bool = False,
                    overwrite: bool = False, address: str | None = None, progress: bool = True,
                    split_by: str | None = None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Prepare ``dataset`` from ``root`` into sharded Parquet at ``out``; returns the manifest.

    Args:
        dataset: one of ``DATASETS``.
        root: the release's directory (reader-specific layout, DESIGN §3); images must lie inside it.
        out: output directory or URI; ``out/<split>/*.parquet``, ``out/_quarantine/``, ``out/_manifest.json``.
        image_max_side: shrink images whose long side exceeds this (0: keep the released size).
        jpeg_quality: quality of re-encoded JPEGs.
        rows_per_shard: image rows per Parquet file (fewer in a split's last shard, and where
            images are quarantined); a shard is also one unit of work for a Ray worker.
        splits: only these splits (default: all in the release).
        strict: fail if any record is quarantined, leaving no output behind.
        overwrite: replace an existing output — built beside it, swapped in when complete.
        address: Ray cluster address (``auto``, ``ray://host:10001``); default: a private local cluster.
        progress: Ray Data progress bars.
        split_by: the release's split scheme (gRefCOCO/RefCOCO/+: ``unc``, RefCOCOg: ``umd``; default: those).
        max_image_bytes: image files larger than this are ``image_too_large``, unread.
        max_image_pixels: images whose header claims more pixels are ``image_too_large``, undecoded.
    """
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; choose from {list(DATASETS)}")
    if rows_per_shard < 1 or image_max_side < 0 or not 1 <= jpeg_quality <= 100:
        raise PrepareError("rows_per_shard must be >= 1, image_max_side >= 0, jpeg_quality in [1, 100]")
    if max_image_bytes < 1 or max_image_pixels < 1:
        raise PrepareError("max_image_bytes and max_image_pixels must be >= 1")
    t0 = time.time()
    fs, out_path = resolve_output(out)
    replacing = check_output(fs, out_path, overwrite=overwrite)

    try:
        source = read_source(dataset, str(root), split_by=split_by)
    except (OSError, ValueError, UnsafePickleError) as e:  # SourceFormatError/UnsafePickleError name file and record
        raise PrepareError(f"cannot read {dataset} from {redact(str(root))}: {e}") from e
    t_read = time.time()
    from pipelines.ray_utils import init_ray

    # Overlap: Ray starts here, in the main thread, while a helper thread plans (module docstring).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="instalign-plan") as pool:
        planning = pool.submit(_plan, source, splits=splits, root=str(root), strict=strict,
                               rows_per_shard=rows_per_shard)
        init_ray(address)
        import ray.data  # noqa: F401 - its import (~1 s) overlaps the planning too

        plan = planning.result()
    log.info("read the release in %.1fs; planned %d shard(s) while Ray started (%.1fs)", t_read - t0,
             len(plan.shards), time.time() - t_read)

    build_path = sibling_path(out_path, "prepare") if replacing else out_path
    if replacing:
        log.info("overwrite: building the new dataset in %s; %s is replaced only once it is complete",
                 redact(build_path), redact(out_path))
    try:
        manifest = _build(fs, build_path, plan, source=source, root=root, dataset=dataset, splits=splits,
                          strict=strict, split_by=split_by, progress=progress, image_max_side=image_max_side,
                          jpeg_quality=jpeg_quality, rows_per_shard=rows_per_shard, max_image_bytes=max_image_bytes,
                          max_image_pixels=max_image_pixels)
    except BaseException as e:
        if replacing and fs.get_file_info(build_path).type != pafs.FileType.NotFound:
            fs.delete_dir(build_path)  # the old dataset was never touched
        elif isinstance(e, PrepareError) and fs.get_file_info(out_path).type == pafs.FileType.Directory:
            fs.delete_dir_contents(out_path)  # --strict: empty before (check_output), so all of it is ours
        raise
    if replacing:
        replace_output(fs, build_path, out_path)
    log.info("prepared %s in %.1fs: %s; quarantined %s", dataset, time.time() - t0,
             {s: c["samples"] for s, c in manifest["counts"].items()}, manifest["quarantined"] or "nothing")
    return manifest


def _build(fs: pafs.FileSystem, out_path: str, plan: _Plan, *, source: GRESSource, root: str, dataset: str,
           splits: list[str] | None, strict: bool, split_by: str | None, progress: bool, image_max_side: int,
           jpeg_quality: int, rows_per_shard: int, max_image_bytes: int, max_image_pixels: int) -> dict:
    """The Ray Data pass, then the quarantine and the manifest (last) at ``out_path``."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    if not progress:  # otherwise Ray's default: bars on a terminal, periodic log lines elsewhere
        ctx.enable_progress_bars = False
    t0 = time.time()
    try:
        stats = _run_pass(plan, fs=fs, out_path=out_path, dataset=dataset, image_max_side=image_max_side,
                          jpeg_quality=jpeg_quality, max_image_bytes=max_image_bytes,
                          max_image_pixels=max_image_pixels)
    finally:
        ctx.enable_progress_bars = bars
    records = plan.records + [r for row in stats for r in json.loads(row["quarantine"])]
    log.info("processed and wrote %d shard(s) in %.1fs", len(stats), time.time() - t0)
    if strict and records:
        raise PrepareError(f"--strict: {len(records)} bad record(s) in {redact(str(root))}:\n"
                           f"{_format_records(records)}")
    counts: dict[str, dict[str, int]] = {}
    files: dict[str, list[str]] = {}
    for split in sorted(splits or {r.split for r in source.refs if is_safe_split_name(r.split)}):
        mine = [r for r in stats if r["split"] == split]
        empty = plan.empty_refs.get(split, 0)
        counts[split] = dict(images=sum(r["images"] for r in mine), refs=sum(r["refs"] for r in mine) + empty,
                             samples=sum(r["samples"] for r in mine),
                             no_target_samples=sum(r["no_target_samples"] for r in mine),
                             multi_target_samples=sum(r["multi_target_samples"] for r in mine),
                             refs_without_sentences=empty)
        files[split] = sorted(r["file"] for r in mine if r["file"])

    fs.create_dir(f"{out_path}/{QUARANTINE_DIR}", recursive=True)
    written = [dict(r, detail=redact(r["detail"])) for r in records]  # details quote paths: nothing secret kept
    with fs.open_output_stream(f"{out_path}/{QUARANTINE_DIR}/quarantine.parquet") as f:
        pq.write_table(pa.Table.from_pylist(written, schema=QUARANTINE_SCHEMA), f)

    from instalign import __version__ as version

    # Every shard's size: the manifest is written last, but a copy (rsync, an upload) can move
    # it before the shards; readers check these sizes (instalign.data.parquet.read_manifest).
    listed = [f"{split}/{name}" for split, names in files.items() for name in names]
    listed.append(f"{QUARANTINE_DIR}/quarantine.parquet")
    file_sizes = {rel: info.size for rel, info in zip(listed, fs.get_file_info([f"{out_path}/{r}" for r in listed]))}
    manifest = dict(
        format="instalign-gres-parquet",
        schema_version=SCHEMA_VERSION,
        dataset=dataset,
        counts=counts,
        files=files,
        file_sizes=file_sizes,
        quarantined=dict(sorted(Counter(r["reason"] for r in records).items())),
        quarantined_samples_dropped=plan.dropped + sum(r["dropped_samples"] for r in stats),
        source=dict(root=redact(str(root)), checksums=dict(source.checksums)),
        options=dict(image_max_side=image_max_side, jpeg_quality=jpeg_quality, rows_per_shard=rows_per_shard,
                     splits=splits, strict=strict, split_by=split_by, max_image_bytes=max_image_bytes,
                     max_image_pixels=max_image_pixels),
        command=command_line(sys.argv),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        instalign_version=version,
    )
    write_manifest(fs, out_path, manifest)
    return manifest


# --- CLI ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="the release's directory (e.g. holding grefcoco/ and images/)")
    parser.add_argument("--out", required=True, help="output directory or URI (s3://…, gs://…)")
    parser.add_argument("--image-max-side", type=int, default=0, help="shrink images to this long side (0: keep)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--rows-per-shard", type=int, default=256,
                        help="image rows per Parquet file; one shard is also one unit of work (default: 256)")
    parser.add_argument("--splits", default="", help="comma-separated splits (default: all)")
    parser.add_argument("--split-by", default=None, help="release split scheme (unc, umd, google; default per dataset)")
    parser.add_argument("--strict", action="store_true", help="fail if any record would be quarantined")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (built beside it, swapped in only when complete)")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                        help=f"larger image files are quarantined unread (default: {DEFAULT_MAX_IMAGE_BYTES})")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"images claiming more pixels are quarantined undecoded (default: "
                             f"{DEFAULT_MAX_IMAGE_PIXELS})")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")


def run(args: argparse.Namespace) -> int:
    """Errors are raised (``PrepareError`` & co.): ``pipelines.cli`` turns them into one line and exit 1."""
    # Our logger only: a root handler would also print Ray Data's DEBUG records (its loggers are set to DEBUG).
    # Attached for this run only, to the stderr of this run: a handler left behind would keep
    # writing to a stream that may be closed by then (pytest's capture, a redirected stderr).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] or None
    try:
        manifest = prepare_dataset(dataset=args.dataset, root=args.root, out=args.out,
                                   image_max_side=args.image_max_side, jpeg_quality=args.jpeg_quality,
                                   rows_per_shard=args.rows_per_shard, splits=splits, strict=args.strict,
                                   overwrite=args.overwrite, address=args.address, progress=not args.no_progress,
                                   split_by=args.split_by, max_image_bytes=args.max_image_bytes,
                                   max_image_pixels=args.max_image_pixels)
    finally:
        log.removeHandler(handler)
    for split, c in manifest["counts"].items():
        print(f"{split:>8}: {c['images']:>7} images {c['refs']:>7} refs {c['samples']:>7} samples "
              f"({c['no_target_samples']} no-target, {c['multi_target_samples']} multi-target)")
    print(f"quarantined: {manifest['quarantined'] or 'nothing'} → {redact(str(args.out))}/{QUARANTINE_DIR}")
    return 0
