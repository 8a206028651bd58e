"""``instalign prepare``: an official release → sharded Parquet + manifest, on Ray Data (DESIGN §3).

The reader of the chosen dataset (``instalign.data.readers``) parses the refs and the COCO
annotations on the driver; the driver checks them, groups the samples (one per sentence)
by ``(image, split)`` so that each image is stored once however many expressions name it,
one *task* row per image, and hands them to Ray Data in shards (below). Per task a worker
reads the image file, decodes every scan of it (a truncated JPEG fails here, not at
training time; a JPEG kept as released is checked at 1/8 scale), optionally shrinks it, and rasterises each target annotation to COCO RLE at the
*stored* size.

This module is the verb: :func:`prepare_dataset` (the driver: read and plan while Ray starts,
one Ray Data pass, quarantine and manifest) and the CLI. The steps live beside it:
``pipelines.data.records`` (the driver-side record checks and the image tasks),
``pipelines.data.shards`` (shard planning and the worker side: one image row, one
shard file) and ``pipelines.data.output`` (the output location, the safe overwrite and
the atomic manifest). Their public names are importable from here too.

Nothing is dropped silently. Every bad record becomes a row of the ``_quarantine`` table
(``QUARANTINE_SCHEMA``) with a reason code and a message naming the file/record; the
manifest counts them. Driver-side checks: ``unknown_image`` (an annotation on an image id
the annotation file does not list) and, from ``readers.reference_problems``,
``missing_image_record`` (a ref on such an image id), ``missing_annotation`` (a ref naming
an annotation id that does not exist), ``annotation_image_mismatch`` (a ref naming an
annotation of another image); ``unsafe_split`` (a ref whose split name could not be a
directory under ``--out``: ``../../escaped``), ``path_escape`` (an image whose
``file_name`` is absolute or climbs out of ``--root``) and ``invalid_file_name`` (one that
cannot name a file: a NUL byte, a lone surrogate). Worker-side, per row inside a
``try``: ``missing_image``, ``not_regular_file`` (a FIFO, a device such as a link to
``/dev/zero``, a directory — refused unread), ``image_too_large`` (over the byte cap, or a
header claiming more pixels than the pixel cap: decompression bombs), ``corrupt_image``
(undecodable or truncated), ``image_size_mismatch`` (file size differs from the annotation
file, so the polygons would not line up), ``invalid_segmentation``, ``invalid_target`` (a
ref dropped because one of its annotations was invalid) and ``unexpected_error``. Ray's
``max_errored_blocks`` is never used: it drops whole blocks with no count (PLATFORM-FACTS,
Ray Data).

Release files are not trusted to steer paths (issue 11): split names must pass
``release_checks.is_safe_split_name`` before they become directories, image paths must stay inside
``--root`` (checked lexically: symlinked image folders keep working), and only regular
files are read, up to ``max_image_bytes``; decoding is refused above ``max_image_pixels``.

One streaming pass (issue 16). The unit of work is a *shard*: up to ``rows_per_shard``
consecutive image tasks of one split, which become exactly one Parquet file
``out/<split>/<split>-NNNNN.parquet``. The task table (Arrow, built on the driver) is put in
the object store once; ``ray.data.range(number of groups)`` feeds groups of consecutive
shards (:func:`group_shards`, ~8 Ray Data tasks per CPU) to a ``map_batches`` UDF
(:func:`write_shards`, run by an actor pool of one :class:`ShardWriter` per CPU, which keeps
each core busy back to back) that looks their rows up in that table, processes each image,
writes each shard's file and returns one small statistics row per shard (counts and the
shard's quarantine records). Image bytes therefore never enter the object store: nothing is
materialised, nothing spills, however large the release (``tests/pipelines/data/test_prepare_streaming.py``:
~117 MB of images through an 80 MiB object store), and each image is decoded once.
The driver streams the statistics rows back (``iter_batches``) and builds the counts, the
quarantine and the manifest from them. Ray Data's own writers do not fit the layout:
``write_parquet(partition_cols=["split"])`` names folders ``split=train`` and drops the
``split`` column, and a write task fed by ``min_rows_per_file`` buffering mixes splits.

Memory per Ray worker (one actor per CPU) is bounded by one shard: its stored image bytes
(``rows_per_shard`` × ~160 KB for COCO-sized JPEGs: ~40 MB at the default 256), its Arrow
table and Parquet encoding buffers (about as much again), plus one decoded image at a time
(~1 MB for COCO; at most ``max_image_pixels`` × 3 bytes, 150 MB at the default cap).

Ray starts while the release is read (issue 16). Only the release's files are located on the
driver first (:func:`instalign.data.release_files.locate_release`: a wrong ``--root`` fails at once,
without Ray); then a forked child process parses and checks them, groups the records by image
and builds the task table (:class:`_Plan`, sent back through a pipe) while ``init_ray`` runs in
the main thread — Ray 2.60 started from another thread makes the process exit at its first
``ray.put`` (measured) — and imports Ray Data. A process, not a thread: ``json.load`` holds
Python's lock for seconds and starved ``ray.init`` (``pipelines.core.forked``). So a bad release is
reported once Ray has started, a few seconds later than a wrong path, and the driver never
holds the parsed release, only the plan. Where forking is not safe (not Linux, or the process
is already connected to Ray, which then has nothing left to start) the driver reads and plans
inline. ``--strict`` with a record quarantined while planning fails before any task runs; one
quarantined by a worker fails the run after the pass, and the shards already written are
removed.

Images are stored as the source bytes when the source is a JPEG that needs no resizing
(no second lossy generation, no encode cost), otherwise re-encoded as RGB JPEG at
``jpeg_quality``. ``image_max_side=0`` keeps the released size; the model's plain resize
to 480×480 (ReLA) happens in the loader, so any stored size ≥ 480 loses nothing.
``_manifest.json`` is written last and atomically: no manifest ⇔ not a finished dataset.

``overwrite`` never destroys before it builds: the new dataset is written to a hidden sibling
(``.<name>.prepare-<hex>`` beside ``--out``) and swapped in only once its manifest is written;
a prepare that fails (``--strict`` with a bad source, a crash, Ctrl-C) removes the sibling
and leaves the old dataset as it was. Locally the swap is two renames; object stores have no
rename, so there the old prefix is deleted and the new one copied in, manifest last. Only a
dataset is ever replaced (``pipelines.core.output_dirs``): not ``--root`` or a directory above it
(symlinks resolved), not a home directory, only a directory holding a manifest or the marker
each build writes first, with nothing else in it. The manifest records the command line and
the source root redacted (``pipelines.core.redaction``), and the release's COCO ``info`` block,
small and redacted, as ``source_info`` (:func:`pipelines.data.records.manifest_source_info`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from instalign import __version__ as version
from instalign.data.images import DEFAULT_MAX_IMAGE_BYTES
from instalign.data.readers import gc_paused, read_release
from instalign.data.records import QUARANTINE_DIR, QUARANTINE_SCHEMA, SCHEMA_VERSION
from instalign.data.release_checks import is_safe_split_name
from instalign.data.release_files import DATASETS, ReleaseFiles, locate_release
from instalign.data.safe_pickle import UnsafePickleError
from instalign.data.source import GRESSource
from pipelines.core.forked import ChildFailed, ForkedCall, fork_is_safe
from pipelines.core.output_dirs import claim_output
from pipelines.core.ray_cluster import init_ray
from pipelines.data.output import check_output, replace_output, resolve_output, sibling_path, write_manifest
from pipelines.data.records import PrepareError, manifest_source_info, plan_tasks, quarantine_record, to_task_table
from pipelines.data.shards import (DEFAULT_MAX_IMAGE_PIXELS, ShardWriter, group_shards, plan_shards,
                                      process_task, shard_file_name)
from pipelines.core.redaction import command_line, redact

#: The verb's API; the rest of these names are re-exported from the modules that define them.
__all__ = ["DATASETS", "PrepareError", "prepare_dataset", "add_arguments", "run", "plan_tasks", "process_task",
           "quarantine_record", "plan_shards", "group_shards", "shard_file_name", "resolve_output", "check_output",
           "replace_output", "write_manifest", "DEFAULT_MAX_IMAGE_PIXELS"]

log = logging.getLogger("instalign.prepare")


# --- the driver -----------------------------------------------------------------------------

def _format_records(records: list[dict], n: int = 5) -> str:
    lines = [f"  [{r['reason']}] {r['detail']}" for r in records[:n]]
    if len(records) > n:
        lines.append(f"  ... and {len(records) - n} more")
    return "\n".join(lines)


@dataclasses.dataclass
class _Plan:
    """What the driver works out from the release while Ray starts: all it keeps of the release."""

    records: list[dict]  # quarantined on the driver
    empty_refs: dict[str, int]
    dropped: int  # samples lost with the driver's quarantined records
    task_table: pa.Table  # ordered as ``shards`` expects
    shards: list[tuple[str, int, int, int]]
    split_names: list[str]  # the release's (safe) splits
    checksums: dict[str, str]  # the release's annotation files
    source_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # manifest_source_info of its info block


def _unreadable(dataset: str, root: str, why: BaseException) -> PrepareError:
    """The one-line error of a release that cannot be read: located, parsed or its reader killed."""
    return PrepareError(f"cannot read {dataset} from {redact(str(root))}: {why}")


@gc_paused()  # all of it: in the forked child the collector would find nothing to free
def _read_and_plan(files: ReleaseFiles, *, splits: list[str] | None, root: str, strict: bool,
                   rows_per_shard: int) -> _Plan:
    """Parse and check the release, then plan its shards (in a forked child while Ray starts)."""
    t0 = time.time()
    try:
        source = read_release(files)
    except (OSError, ValueError, UnsafePickleError) as e:  # SourceFormatError/UnsafePickleError name file and record
        raise _unreadable(files.dataset, root, e) from e
    t_read = time.time()
    plan = _plan(source, splits=splits, root=root, strict=strict, rows_per_shard=rows_per_shard)
    log.info("read the release in %.1fs; planned %d shard(s) in %.1fs", t_read - t0, len(plan.shards),
             time.time() - t_read)
    return plan


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
    return _Plan(records, dict(empty_refs), dropped, to_task_table(ordered, root), shards,
                 split_names=[s for s in source.splits() if is_safe_split_name(s)],
                 checksums=dict(source.checksums), source_info=manifest_source_info(source.info))


def _run_pass(plan: _Plan, *, fs: pafs.FileSystem, out_path: str, dataset: str, **options: Any) -> list[dict]:
    """The one Ray Data pass: every shard processed and written once; returns the statistics rows,
    in shard order."""
    import ray  # lazy: Ray's import overlaps the release's reading (prepare_dataset)
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
    # One actor per CPU, started at once; the pass goes on with those that start when the
    # cluster is shared (min_size=1), so a busy cluster slows it rather than stalls it.
    actors = ray.data.ActorPoolStrategy(min_size=1, max_size=cpus, initial_size=min(cpus, len(groups)))
    stats = (ray.data.range(len(groups), override_num_blocks=len(groups))
             .map_batches(ShardWriter, compute=actors, batch_size=None, batch_format="numpy", num_cpus=1,
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
    replacing = check_output(fs, out_path, overwrite=overwrite, root=str(root))  # never --root, nor above it

    try:
        files = locate_release(dataset, str(root), split_by=split_by)  # a wrong --root: refused before Ray starts
    except (OSError, ValueError) as e:  # SourceFormatError names the file
        raise _unreadable(dataset, root, e) from e
    planning = dict(splits=splits, root=str(root), strict=strict, rows_per_shard=rows_per_shard)
    if fork_is_safe():  # Ray starts while a child process reads and plans (module docstring)
        with ForkedCall(functools.partial(_read_and_plan, files, **planning), name="release reader") as reading:
            init_ray(address, data_only=True)
            import ray.data  # noqa: F401 - its import (~1 s) overlaps the reading too

            t_ray = time.time()
            try:
                plan = reading.result()
            except ChildFailed as e:  # killed (out of memory?): the one line says so
                raise _unreadable(dataset, root, e) from e
        log.info("Ray started in %.1fs while a child process read the release; waited %.1fs more for its plan",
                 t_ray - t0, time.time() - t_ray)
    else:
        plan = _read_and_plan(files, **planning)
        init_ray(address, data_only=True)

    build_path = sibling_path(out_path, "prepare") if replacing else out_path
    if replacing:
        log.info("overwrite: building the new dataset in %s; %s is replaced only once it is complete",
                 redact(build_path), redact(out_path))
    try:
        manifest = _build(fs, build_path, plan, root=root, dataset=dataset, splits=splits,
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


def _build(fs: pafs.FileSystem, out_path: str, plan: _Plan, *, root: str, dataset: str,
           splits: list[str] | None, strict: bool, split_by: str | None, progress: bool, image_max_side: int,
           jpeg_quality: int, rows_per_shard: int, max_image_bytes: int, max_image_pixels: int) -> dict:
    """The marker (first), the Ray Data pass, then the quarantine and the manifest (last) at ``out_path``."""
    from ray.data import DataContext  # lazy, as in _run_pass

    claim_output(fs, out_path)  # an interrupted build stays replaceable by --overwrite (pipelines.core.output_dirs)

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
    for split in sorted(splits or plan.split_names):
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
        source=dict(root=redact(str(root)), checksums=plan.checksums),
        source_info=plan.source_info,
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
    # With ``--log-level`` the CLI has configured the root logger (``flags.setup_logging``), Ray's
    # loggers held at that level too: no handler of our own then.
    handler = None if getattr(args, "log_level", None) else logging.StreamHandler()
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(getattr(args, "log_level", None) or logging.INFO)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] or None
    try:
        manifest = prepare_dataset(dataset=args.dataset, root=args.root, out=args.out,
                                   image_max_side=args.image_max_side, jpeg_quality=args.jpeg_quality,
                                   rows_per_shard=args.rows_per_shard, splits=splits, strict=args.strict,
                                   overwrite=args.overwrite, address=args.address, progress=not args.no_progress,
                                   split_by=args.split_by, max_image_bytes=args.max_image_bytes,
                                   max_image_pixels=args.max_image_pixels)
    finally:
        if handler is not None:
            log.removeHandler(handler)
    for split, c in manifest["counts"].items():
        print(f"{split:>8}: {c['images']:>7} images {c['refs']:>7} refs {c['samples']:>7} samples "
              f"({c['no_target_samples']} no-target, {c['multi_target_samples']} multi-target)")
    print(f"quarantined: {manifest['quarantined'] or 'nothing'} → {redact(str(args.out))}/{QUARANTINE_DIR}")
    return 0
