"""``instalign prepare``, worker side: shards of image tasks → Parquet files + statistics rows.

The driver orders the tasks (``pipelines.data.records``) and cuts each split into shards
(:func:`plan_shards`), groups consecutive shards into Ray tasks (:func:`group_shards`), and
runs :func:`write_shards` over them with Ray Data (``pipelines.data.prepare``). Per image a worker
reads the file (regular files only, up to ``max_image_bytes``), decodes every scan of it (a
truncated JPEG fails here, not at training time; a JPEG kept as its bytes is decoded at 1/8
scale, ``VERIFY_DRAFT``; more than ``max_image_pixels`` is refused at the header), optionally
shrinks it, and rasterises each target annotation to COCO RLE at
the *stored* size (:func:`process_task`). A bad row is quarantined, never raised
(``missing_image``, ``not_regular_file``, ``image_too_large``, ``unsupported_image_format`` (not
JPEG, PNG, WebP, BMP, GIF or TIFF), ``corrupt_image``, ``image_size_mismatch``,
``invalid_segmentation``, ``invalid_target``, ``unexpected_error``).
Each shard becomes exactly one Parquet file ``out/<split>/<split>-NNNNN.parquet`` and one
``STATS_SCHEMA`` row for the driver: image bytes never enter the object store.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from instalign.data.images import (DEFAULT_MAX_IMAGE_BYTES, CorruptImageError, ImageTooLargeError,
                                   NotARegularFileError, UnsupportedImageFormatError, decode_image, encode_jpeg,
                                   read_image_size, read_regular_file)
from instalign.data.masks import resize_rle, segmentation_to_rle
from instalign.data.readers import gc_paused
from instalign.data.records import IMAGE_SCHEMA
from pipelines.data.records import quarantine_record, task_segmentation

#: Decoded-pixel cap per image: 50 M pixels (150 MB as RGB) is an 8K photograph; COCO's largest
#: image has 0.4 M. A header claiming more is ``image_too_large`` before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
#: The draft size for a JPEG whose bytes are stored as they are, decoded only to check it: PIL
#: picks libjpeg's smallest DCT scale (1/8). Every scan is still entropy-decoded, so truncated
#: and broken streams fail exactly as in a full decode (``test_prepare_images``), at ~40 % of its cost
#: (0.9 against 2.1–2.4 ms for a 640×480 COCO JPEG here).
VERIFY_DRAFT = (1, 1)
_JPEG_MAGIC = b"\xff\xd8\xff"

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

# --- the driver's plan: which rows make a shard, which shards a Ray task -----------------------

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


#: Ray Data tasks per CPU in the pass: shards are grouped into about this many tasks per CPU.
#: Each task has a fixed cost beyond its work (a block in, a statistics block and its metadata
#: out: ~85 ms on 2 cores when every task was a fresh task-pool task), so not one task per
#: shard; enough of them to balance the cores at the end.
TASKS_PER_CPU = 8


def group_shards(num_shards: int, cpus: int, tasks_per_cpu: int = TASKS_PER_CPU) -> list[tuple[int, int]]:
    """Consecutive shard ranges ``(first, end)``, one per Ray task: ``tasks_per_cpu × cpus`` of
    them (fewer when there are fewer shards), as equal as the shard count allows."""
    n = max(1, min(num_shards, tasks_per_cpu * cpus))
    bounds = [round(i * num_shards / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


# --- one image row ---------------------------------------------------------------------------

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
        keep = size == (width, height) == (out_w, out_h) and data[:3] == _JPEG_MAGIC
        # The whole stream is decoded even when the bytes are kept: truncation must surface now,
        # not in training. Kept bytes are only checked, so at libjpeg's 1/8 DCT scale (``VERIFY_DRAFT``).
        img = decode_image(data, source=path, max_pixels=max_image_pixels,
                           draft_size=VERIFY_DRAFT if keep else (out_w, out_h) if (out_w, out_h) != size else None)
    except ImageTooLargeError as e:
        return row, [quarantine_record(**where, reason="image_too_large", detail=f"image {image_id}: {e}; {lost}")]
    except UnsupportedImageFormatError as e:
        return row, [quarantine_record(**where, reason="unsupported_image_format",
                                       detail=f"image {image_id}: {e}; {lost}")]
    except CorruptImageError as e:
        return row, [quarantine_record(**where, reason="corrupt_image", detail=f"image {image_id}: {e}; {lost}")]
    if size != (width, height):
        return row, [quarantine_record(**where, reason="image_size_mismatch",
                                       detail=f"image {image_id} ({path}) is {size[0]}×{size[1]} but the "
                                              f"annotation file says {width}×{height}; {lost}")]
    if keep:
        encoded = data  # already a JPEG at the stored size: no second lossy generation
    else:
        if img.size != (out_w, out_h):
            img = img.resize((out_w, out_h), Image.BILINEAR, reducing_gap=3.0)  # antialiased when shrinking
        encoded = encode_jpeg(img, quality=jpeg_quality)

    records, instances, bad = [], [], set()
    for inst in task["instances"]:
        try:
            rle = _rasterise(task_segmentation(inst), height=height, width=width, out_h=out_h, out_w=out_w)
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


# --- one shard, one Ray task ---------------------------------------------------------------

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


# Without the cycle collector (``readers.gc_paused``): a shard's task rows become thousands of
# lists and dicts (polygons, samples), none in a cycle, and each collection of the oldest
# generation walks the worker's whole heap (Ray, pyarrow, PIL: ~120,000 objects). Measured at
# 10,000 images in one process with that heap: the rows of every shard in 0.97-1.1 CPU-s with
# it, 0.38 without; all shards written in 13.65 CPU-s against 12.97. Memory is as before:
# reference counting frees everything (a collection after 3,000 images found no garbage).
@gc_paused()
def write_shards(batch: dict[str, np.ndarray], *, tasks: Any, shards: list[tuple[str, int, int, int]],
                 groups: list[tuple[int, int]], **kwargs: Any) -> pa.Table:
    """Ray Data UDF over ``ray.data.range(len(groups))``: group indices → the statistics rows
    of their shards.

    ``tasks`` is the whole task table, or on Ray its ``ObjectRef`` (Arrow: read zero-copy from
    the node's object store); ``shards[i]`` is ``(split, index in split, first row, end row)``;
    group ``g`` is the shards ``range(*groups[g])``, processed one after the other (memory:
    one shard). ``kwargs`` are :func:`write_shard`'s.
    """
    if isinstance(tasks, pa.Table):
        table = tasks
    else:
        import ray  # lazy: prepare imports this module on the driver before Ray (its import overlaps the reading)

        table = ray.get(tasks)
    out = []
    for g in batch["id"]:
        for i in range(*groups[int(g)]):
            split, index, start, stop = shards[i]
            stats = write_shard(table.slice(start, stop - start).to_pylist(), split=split, index=index, **kwargs)
            out.append(dict(stats, shard=i))
    return pa.Table.from_pylist(out, schema=STATS_SCHEMA)


class ShardWriter:
    """:func:`write_shards` as the callable class of Ray Data's actor pool (``pipelines.data.prepare``).

    Why actors rather than plain tasks: with a task pool, Ray Data's executor learns that a task
    has finished at its next poll (``ray.wait`` with a 0.1 s timeout) and only then leases a
    worker for the next one, so each worker idled 0.15–0.2 s after every ~0.35 s task (Ray's
    timeline, 3,000 images on 2 cores: a third of the pass). An actor is sent its next task
    while it runs the current one (Ray Data's default of two in flight per actor), so the
    tasks run back to back. The pass went 5.2–6.2 s → 4.8 s at 3,000 images on a running
    cluster. A killed actor is restarted and its task retried (Ray Data's defaults for actor
    pools; ``tests/pipelines/data/test_prepare_streaming.py``): the retried shard's file is rewritten whole.
    Memory is unchanged: the UDF runs one task at a time per actor, and a queued task's input
    is one small block of group indices.
    """

    def __call__(self, batch: dict[str, np.ndarray], **kwargs: Any) -> pa.Table:
        return write_shards(batch, **kwargs)
