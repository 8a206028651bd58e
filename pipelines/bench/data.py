"""``instalign bench data``: prepare and loader throughput on COCO-sized synthetic data.

What is measured, on data shaped like gRefCOCO (DESIGN §3) rather than the tiny test set:
640×480 photo-like JPEGs (~COCO's file size), 7 polygon instances per image (~COCO's mean),
~14 sentences per image (gRefCOCO: 278k expressions over 20k images), written in the exact
gRefCOCO layout and read by the real reader.

* **prepare** — ``prepare_dataset`` end to end as a user runs it (read the release, start a
  private Ray cluster, one Ray Data pass of decode + RLE + Parquet write, manifest) in images/s,
  and per CPU of the Ray cluster; then again as a job on a running cluster: a new Python
  process joins that cluster and prepares the same images (:func:`bench_prepare_job`), which
  pays for importing Ray, connecting and starting the pass's actors, not for Ray's start;
* **loader** — ``load_samples`` → ``iter_torch_batches(collate_fn=RowsToBatch("cpu"))`` at
  S×S (480 by default) in training samples/s, per CPU, cold (1st epoch: worker start-up,
  tokenizer load, imports) and warm; and warm as raw uint8 numpy batches, which is what the
  CPU side of a GPU trainer pays (there ``RowsToBatch("cuda")`` normalises on the GPU);
* **baselines** — the same per-image functions in one plain Python process (no Ray):
  ``process_task`` + a pyarrow write for prepare, ``ParquetGRES`` (with and without
  ``collate``) for the loader. On few cores Ray's per-task overhead can make it slower than the plain loop
  (PLATFORM-FACTS, Ray Data); the table says so instead of hiding it.
* **ratios** — from one run on the same images: prepare's images/s over the plain loop's (both
  ways: with Ray's start, and on a running cluster), and
  the Ray loader's warm samples/s over ``ParquetGRES``'s, whole and per core, printed with
  the CPU count and the load average (issue 16's goals: prepare ≥ 1.6× at 10,000 images on
  2 cores, ≥ 1.2× at 3,000; the loader ≥ 1× per core).

Per core is reported two ways: wall-clock rate / CPUs, and items per CPU-second consumed by
the whole local process tree (``pipelines.bench.clock``). The release is written by
``pipelines.bench.coco_like``.

Targets (docs/performance.md): prepare ≥ 100 images/s/core, loader ≥ 150 samples/s/core.
Speed targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow.fs import LocalFileSystem

from instalign.config import tiny
from instalign.data.readers import read_source
from instalign.data.records import IMAGE_SCHEMA
from instalign.errors import USAGE
from pipelines.bench.clock import Clock, TreeCPU
from pipelines.bench.coco_like import make_coco_like, release_owns
from pipelines.bench.command import BenchError
from pipelines.core import flags
from pipelines.core.output_dirs import MARKER_NAME, check_report_path, claim_output, replaceable_output
from pipelines.core.ray_cluster import init_ray
from pipelines.core.resources import cluster_cpus
from pipelines.data.prepare import prepare_dataset
from pipelines.data.records import plan_tasks
from pipelines.data.shards import process_task

# Ray Data and torch are imported inside the functions that use them: the new driver of
# bench_prepare_job imports this module, and its timed prepare and its CPU seconds must not
# change with what this module imports (torch and the loader: 2.6 CPU-s measured);
# ``instalign bench data --help`` imports it too. (Ray itself comes with prepare's init_ray.)
TARGETS = {"prepare": 100.0, "loader": 150.0}
_WORDS = dict(
    colour=["red", "blue", "green", "white", "black", "brown", "yellow", "gray"],
    thing=["person", "man", "woman", "dog", "cat", "car", "chair", "table", "cup", "bottle", "bus", "horse"],
    where=["on the left", "on the right", "in the middle", "at the back", "in front", "near the table",
           "next to the window", "behind the man"],
)


def bench_prepare(root: Path, out: Path, *, rows_per_shard: int, address: str | None = None) -> dict:
    """``prepare_dataset`` as a user runs it: with no Ray connection yet in this process, the
    time includes starting the private cluster (which prepare overlaps with planning)."""
    with Clock() as clock:
        manifest = prepare_dataset(dataset="grefcoco", root=str(root), out=str(out), rows_per_shard=rows_per_shard,
                                   overwrite=True, progress=False, address=address)
    return clock.result(manifest["counts"]["train"]["images"])


def bench_prepare_job(root: Path, out: Path, *, rows_per_shard: int, address: str) -> dict:
    """``prepare_dataset`` in a new Python process joining the running cluster at ``address``,
    as a job submitted to a cluster runs it: that process imports Ray, connects and runs the
    pass; the cluster and its node-wide actors are already up.

    The time is measured inside that process around ``prepare_dataset`` (like the loop's, after
    its imports); the CPU seconds are this process's tree across the run: the new driver, and
    the cluster's processes when this process started them (``NaN`` per CPU-second otherwise).
    """
    code = ("import json, sys; from pathlib import Path; from pipelines.bench.data import bench_prepare; "
            "print(json.dumps(bench_prepare(Path(sys.argv[1]), Path(sys.argv[2]), rows_per_shard=int(sys.argv[3]), "
            "address=sys.argv[4])))")
    with TreeCPU() as cpu:
        done = subprocess.run([sys.executable, "-c", code, str(root), str(out), str(rows_per_shard), address],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"prepare in a new driver failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(result, cpu_seconds=cpu.seconds)


def baseline_prepare(root: Path, out: Path) -> dict:
    """The same per-image work in one process: read, plan, ``process_task`` each image, one Parquet write."""
    with Clock() as clock:
        tasks, *_ = plan_tasks(read_source("grefcoco", str(root)))
        rows = [process_task(t, dataset="grefcoco", image_max_side=0, jpeg_quality=90)[0] for t in tasks]
        claim_output(LocalFileSystem(), str(out.absolute()))
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in IMAGE_SCHEMA.names} for r in rows],
                                            schema=IMAGE_SCHEMA), out / "baseline.parquet")
    return clock.result(len(rows))


def bench_loader(data_dir: Path, *, image_size: int, batch_size: int, text_cfg) -> list[tuple[str, dict]]:
    """Ray loader passes: a cold and a warm epoch into CPU ``Batch``-es, and a warm epoch of
    raw uint8 numpy batches (what the CPU side of a GPU trainer pays before normalising on the GPU)."""
    from pipelines.data.loader import RowsToBatch, load_samples

    results = []
    for epoch, (label, collate) in enumerate([("Ray Data → Batch on CPU, 1st epoch (cold)", True),
                                              ("Ray Data → Batch on CPU, 2nd epoch", True),
                                              ("Ray Data → uint8 numpy batches", False)]):
        ds = load_samples(str(data_dir), "train", text_cfg=text_cfg, image_size=image_size, seed=epoch)
        it = (ds.iter_torch_batches(batch_size=batch_size, collate_fn=RowsToBatch("cpu"), prefetch_batches=2)
              if collate else ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2))
        n = 0
        with Clock() as clock:
            for batch in it:
                n += len(batch) if collate else len(batch["sample_id"])
        results.append((label, clock.result(n)))
    return results


def baseline_loader(data_dir: Path, *, image_size: int, batch_size: int, text_cfg) -> list[tuple[str, dict]]:
    """``ParquetGRES`` in this process: samples only, then samples + ``collate`` into a CPU ``Batch``."""
    from torch.utils.data import DataLoader

    from instalign.data.parquet import ParquetGRES
    from instalign.data.transforms import GRESTransform
    from instalign.modeling.text_encoder import load_tokenizer

    transform = GRESTransform(image_size=image_size, max_tokens=text_cfg.max_tokens, tokenizer=load_tokenizer(text_cfg))
    out = []
    with Clock() as clock:
        ds = ParquetGRES(str(data_dir), "train", transform)
        n = sum(1 for _ in ds)
    out.append(("1 process, no Ray: samples", clock.result(n)))
    with Clock() as clock:
        ds = ParquetGRES(str(data_dir), "train", transform)
        n = sum(len(b) for b in DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate, num_workers=0))
    out.append(("1 process, no Ray: → Batch on CPU", clock.result(n)))
    return out


def table_row(stage: str, path: str, r: dict, cpus: float, unit: str) -> dict:
    rate = r["items"] / r["seconds"]
    return dict(stage=stage, path=path, items=r["items"], seconds=round(r["seconds"], 2), rate=round(rate, 1),
                cpus=cpus, per_core=round(rate / cpus, 1), cpu_seconds=round(r["cpu_seconds"], 2),
                per_cpu_second=round(r["items"] / r["cpu_seconds"], 1) if r["cpu_seconds"] > 0 else float("nan"),
                unit=unit, target=TARGETS.get(stage.split(" ")[0]))


#: The path of :func:`bench_prepare_job`'s row.
RUNNING_CLUSTER = "Ray Data, new driver on a running cluster (as a job)"
#: The comparisons ``run`` prints: (what, stage prefix, the Ray path, the plain path).
RATIOS = (
    ("prepare, Ray Data / plain loop", "prepare", "Ray Data (incl. Ray start)", "1 process, no Ray"),
    ("prepare on a running cluster, Ray Data / plain loop", "prepare", RUNNING_CLUSTER, "1 process, no Ray"),
    ("loader, Ray Data / plain Parquet reader", "loader", "Ray Data → Batch on CPU, 2nd epoch",
     "1 process, no Ray: → Batch on CPU"),
)


def speed_ratios(rows: list[dict]) -> list[dict]:
    """Ray's rate over the plain path's, measured in the same run on the same images: as a
    whole (wall clock) and per core (each rate divided by the CPUs it had)."""
    out = []
    for what, stage, ray_path, plain_path in RATIOS:
        found = {r["path"]: r for r in rows if r["stage"].split(" ")[0] == stage}
        if ray_path in found and plain_path in found:
            ray_row, plain = found[ray_path], found[plain_path]
            out.append(dict(what=what, ratio=ray_row["rate"] / plain["rate"], ray_rate=ray_row["rate"],
                            plain_rate=plain["rate"], per_core_ratio=ray_row["per_core"] / plain["per_core"],
                            unit=ray_row["unit"]))
    return out


# --- CLI ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=192, help="synthetic 640×480 images to generate")
    parser.add_argument("--image-size", type=int, default=480, help="loader output side S")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--work-dir", default=None,
                        help="where to write the data (default: a temporary dir); its release/, prepared/ and "
                             "baseline/ are replaced only if this benchmark wrote them")
    flags.add_address(parser)
    parser.add_argument("--stages", default="prepare,loader", help="comma-separated: prepare, loader")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    check_report_path(args.json)  # before the measurement: never a file this project did not write
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="instalign-bench-data-"))
    root, out = work / "release", work / "prepared"
    kept = root / "totals.json"  # a --work-dir holding the same release is reused (10,000 images take minutes)
    if kept.is_file() and json.loads(kept.read_text()).get("images") == args.images:
        totals = json.loads(kept.read_text())
        print(f"reusing {totals} under {root}")
    else:  # replaced only if this benchmark wrote it (pipelines.core.output_dirs): never a --work-dir's other files
        if replaceable_output(LocalFileSystem(), str(root.absolute()), owns=release_owns):
            shutil.rmtree(root)
        t0 = time.perf_counter()
        totals = make_coco_like(root, num_images=args.images)
        kept.write_text(json.dumps(totals))
        print(f"generated {totals} in {time.perf_counter() - t0:.1f}s under {root}")
    text_cfg = tiny().model.text_encoder  # offline tokenizer; tokenising is a small share of the work
    import torch

    # One intra-op thread in this process (the collate of both loaders runs here), as Ray gives its
    # 1-CPU tasks: measured on a busy 2-core machine, two threads spin-waiting for each other cost
    # 5× the CPU time of the same collate on one thread.
    torch.set_num_threads(1)

    stages = {x.strip() for x in args.stages.split(",") if x.strip()}
    unknown = stages - {"prepare", "loader"}
    if unknown:
        raise BenchError(f"data: unknown stage(s) {sorted(unknown)}; choose from prepare, loader", exit_code=USAGE)
    rows = []
    # Prepare first, before this process connects to Ray: its time includes Ray's start, as a
    # user's `instalign prepare` does. The plain loop runs first on the same images (both read
    # them from the page cache: they were just written).
    if "prepare" in stages and not args.skip_baseline:
        replaceable_output(LocalFileSystem(), str((work / "baseline").absolute()),
                           owns=lambda rel: rel in (MARKER_NAME, "baseline.parquet"))
        rows.append(table_row("prepare", "1 process, no Ray", baseline_prepare(root, work / "baseline"), 1, "images/s"))
    # Then prepare as a user's first run: `instalign prepare` with no --address starts a private
    # cluster (timed); this process stays connected to it. With --address, it joins that cluster.
    ray_prepare = bench_prepare(root, out, rows_per_shard=args.rows_per_shard, address=args.address)
    init_ray(args.address)  # already connected by prepare: reused
    cpus = cluster_cpus()
    if "prepare" in stages:
        if not args.address:
            rows.append(table_row("prepare", "Ray Data (incl. Ray start)", ray_prepare, cpus, "images/s"))
        # And as a job on a running cluster: a new driver process joins the cluster (the one
        # just started, or --address's) and prepares the same images again.
        job = bench_prepare_job(root, out, rows_per_shard=args.rows_per_shard,
                                address=args.address or ray.get_runtime_context().gcs_address)
        if args.address:  # the cluster's processes are not this process's children: not counted
            job["cpu_seconds"] = float("nan")
        rows.append(table_row("prepare", RUNNING_CLUSTER, job, cpus, "images/s"))
    if "loader" in stages:
        stage = f"loader {args.image_size}²"
        for label, r in bench_loader(out, image_size=args.image_size, batch_size=args.batch_size, text_cfg=text_cfg):
            rows.append(table_row(stage, label, r, cpus, "samples/s"))
        if not args.skip_baseline:
            for label, r in baseline_loader(out, image_size=args.image_size, batch_size=args.batch_size,
                                            text_cfg=text_cfg):
                rows.append(table_row(stage, label, r, 1, "samples/s"))
    ratios = speed_ratios(rows)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {os.cpu_count()} CPUs visible, Ray cluster {cpus:g} CPUs, load average {load:.1f}; "
          f"{args.images} images, {totals['samples']} samples")
    print("| stage | path | items | wall s | items/s | CPUs | items/s/core (wall) | CPU s | items per CPU-s "
          "| target/core |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['path']} | {r['items']} | {r['seconds']} | {r['rate']} {r['unit']} | "
              f"{r['cpus']:g} | {r['per_core']} | {r['cpu_seconds']} | {r['per_cpu_second']} | {r['target'] or ''} |")
    for r in ratios:
        print(f"{r['what']}: {r['ratio']:.2f}× ({r['ray_rate']:.1f} vs {r['plain_rate']:.1f} {r['unit']}; "
              f"per core {r['per_core_ratio']:.2f}× on {cpus:g} CPUs, load average {load:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(totals=totals, rows=rows, ratios=ratios, load=load), indent=2))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.data", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
