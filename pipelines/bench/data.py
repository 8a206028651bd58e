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
the whole local process tree (driver + Ray's raylet, object store and workers, from
``/proc``, sampled so that processes ending meanwhile count: :class:`TreeCPU`). The second
is what a core delivers when busy, and stays meaningful on a shared machine where wall time
measures the neighbours' load too.

Targets (README Performance table): prepare ≥ 100 images/s/core, loader ≥ 150 samples/s/core.
Speed targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pyarrow.fs import LocalFileSystem

from pipelines.core import flags
from pipelines.core.output_dirs import MARKER_NAME, check_report_path, claim_output, replaceable_output

if TYPE_CHECKING:
    from PIL import Image

TARGETS = {"prepare": 100.0, "loader": 150.0}
_WORDS = dict(
    colour=["red", "blue", "green", "white", "black", "brown", "yellow", "gray"],
    thing=["person", "man", "woman", "dog", "cat", "car", "chair", "table", "cup", "bottle", "bus", "horse"],
    where=["on the left", "on the right", "in the middle", "at the back", "in front", "near the table",
           "next to the window", "behind the man"],
)


# --- a COCO-sized gRefCOCO ------------------------------------------------------------------

def _polygon(rng: np.random.Generator, w: int, h: int) -> list[float]:
    """A star-shaped polygon with 16–40 vertices (COCO polygons are detailed)."""
    n = int(rng.integers(16, 41))
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    r = rng.uniform(0.05, 0.25) * min(w, h)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + rad * np.cos(ang), 0, w - 1)
    ys = np.clip(cy + rad * np.sin(ang), 0, h - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def _picture(rng: np.random.Generator, w: int, h: int, polys: list[list[float]]) -> "Image.Image":
    from PIL import Image, ImageDraw

    # Smooth colour field + fine noise: compresses like a photo (~100-200 KB at q90), not like a flat fill.
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
    base += rng.integers(-18, 19, size=(h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for p in polys:
        draw.polygon(p, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


#: What :func:`make_coco_like` writes under a release root (relative paths; directories end with ``/``).
_RELEASE_FILE = re.compile(r"totals\.json|grefcoco/(instances\.json|grefs\(unc\)\.json)?|images/(train2014/"
                           r"(COCO_train2014_\d{12}\.jpg)?)?")


def release_owns(rel: str) -> bool:
    """Whether ``rel`` is part of a release this benchmark generated (``pipelines.core.output_dirs``'s ``owns``)."""
    return rel == MARKER_NAME or _RELEASE_FILE.fullmatch(rel) is not None


def make_coco_like(root: str | Path, *, num_images: int, seed: int = 0, instances: int = 7) -> dict:
    """Write ``num_images`` COCO-sized images + refs in the gRefCOCO layout; return totals.

    The marker goes first (``output_dirs.claim_output``): a later run may replace this release."""
    root = Path(root)
    claim_output(LocalFileSystem(), str(root.absolute()))
    image_dir, ann_dir = root / "images" / "train2014", root / "grefcoco"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns, refs = [], [], []
    sent_id = 0
    for i in range(num_images):
        image_id, w, h = 1_000_000 + i, 640, 480
        polys = [_polygon(rng, w, h) for _ in range(instances)]
        _picture(rng, w, h, polys).save(image_dir / f"COCO_train2014_{image_id:012d}.jpg", quality=90)
        images.append(dict(id=image_id, file_name=f"COCO_train2014_{image_id:012d}.jpg", width=w, height=h))
        ids = []
        for p in polys:
            ids.append(len(anns) + 1)
            anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=1, segmentation=[p], iscrowd=0,
                             area=0.0, bbox=[0, 0, 1, 1]))
        targets = [[a] for a in ids] + [list(rng.choice(ids, size=int(rng.integers(2, 4)), replace=False))
                                        for _ in range(2)] + [[]]
        for t in targets:
            sents = []
            for _ in range(int(rng.integers(1, 3))):
                text = " ".join([str(rng.choice(_WORDS[k])) for k in ("colour", "thing", "where")])
                sents.append(dict(raw=text, sent=text, tokens=text.split(), sent_id=sent_id))
                sent_id += 1
            refs.append(dict(ref_id=len(refs), image_id=image_id, split="train", ann_id=[int(a) for a in t] or [-1],
                             category_id=[1] * len(t) or [-1], sentences=sents, no_target=not t,
                             file_name=f"COCO_train2014_{image_id:012d}_{len(refs)}.jpg"))
    (ann_dir / "instances.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=[
        dict(id=1, name="thing", supercategory="thing")])))
    (ann_dir / "grefs(unc).json").write_text(json.dumps(refs))
    return dict(images=num_images, annotations=len(anns), refs=len(refs), samples=sent_id)


# --- measurements -----------------------------------------------------------------------------

def tree_cpu_by_pid() -> dict[int, float]:
    """CPU seconds (user + system) each process of this process's tree has used so far.

    A local Ray cluster (raylet, object store, workers) descends from the driver that started
    it, so this covers Ray's own overhead too. Linux ``/proc`` only (empty elsewhere).
    """
    if not os.path.isdir("/proc/self"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:  # exited meanwhile
            continue
        rest = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        procs[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)  # ppid; utime + stime
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return {p: procs[p][1] for p in tree if p in procs}


class TreeCPU:
    """CPU seconds this process tree uses over a block, processes that exit meanwhile included.

    Sampled every ``every_s`` seconds: a process that ends keeps its last sample (so it loses
    at most one interval), and a parent's count never includes its children's (no ``cutime``:
    Ray's raylet does not reap its workers with ``wait``, so their time would vanish from it).
    Per-core throughput is then items per CPU-second: unlike wall time it does not move when
    other jobs share the cores.
    """

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.seconds = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instalign-bench-cpu", daemon=True)

    def _sample(self) -> None:
        self._last.update(tree_cpu_by_pid())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> "TreeCPU":
        self._first = tree_cpu_by_pid()
        self._last = dict(self._first)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._first:
            self.seconds = sum(cpu - self._first.get(pid, 0.0) for pid, cpu in self._last.items())


class _Clock:
    """Wall and process-tree CPU time of a block."""

    def __enter__(self) -> "_Clock":
        self._cpu = TreeCPU().__enter__()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self._cpu.__exit__(*exc)
        self.cpu = self._cpu.seconds

    def result(self, items: int) -> dict:
        return dict(seconds=self.wall, cpu_seconds=self.cpu, items=items)


def bench_prepare(root: Path, out: Path, *, rows_per_shard: int, address: str | None = None) -> dict:
    """``prepare_dataset`` as a user runs it: with no Ray connection yet in this process, the
    time includes starting the private cluster (which prepare overlaps with planning)."""
    from pipelines.data.prepare import prepare_dataset

    with _Clock() as clock:
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
    import subprocess
    import sys

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
    import pyarrow as pa
    import pyarrow.parquet as pq

    from instalign.data.readers import read_source
    from instalign.data.records import IMAGE_SCHEMA
    from pipelines.data.records import plan_tasks
    from pipelines.data.shards import process_task

    with _Clock() as clock:
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
        with _Clock() as clock:
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
    with _Clock() as clock:
        ds = ParquetGRES(str(data_dir), "train", transform)
        n = sum(1 for _ in ds)
    out.append(("1 process, no Ray: samples", clock.result(n)))
    with _Clock() as clock:
        ds = ParquetGRES(str(data_dir), "train", transform)
        n = sum(len(b) for b in DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate, num_workers=0))
    out.append(("1 process, no Ray: → Batch on CPU", clock.result(n)))
    return out


def _row(stage: str, path: str, r: dict, cpus: float, unit: str) -> dict:
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
    from instalign.config import tiny
    from pipelines.core.ray_cluster import init_ray
    from pipelines.core.resources import cluster_cpus

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
        raise SystemExit(f"instalign bench data: unknown stage(s) {sorted(unknown)}; choose from prepare, loader")
    rows = []
    # Prepare first, before this process connects to Ray: its time includes Ray's start, as a
    # user's `instalign prepare` does. The plain loop runs first on the same images (both read
    # them from the page cache: they were just written).
    if "prepare" in stages and not args.skip_baseline:
        replaceable_output(LocalFileSystem(), str((work / "baseline").absolute()),
                           owns=lambda rel: rel in (MARKER_NAME, "baseline.parquet"))
        rows.append(_row("prepare", "1 process, no Ray", baseline_prepare(root, work / "baseline"), 1, "images/s"))
    # Then prepare as a user's first run: `instalign prepare` with no --address starts a private
    # cluster (timed); this process stays connected to it. With --address, it joins that cluster.
    ray_prepare = bench_prepare(root, out, rows_per_shard=args.rows_per_shard, address=args.address)
    init_ray(args.address)  # already connected by prepare: reused
    cpus = cluster_cpus()
    if "prepare" in stages:
        if not args.address:
            rows.append(_row("prepare", "Ray Data (incl. Ray start)", ray_prepare, cpus, "images/s"))
        # And as a job on a running cluster: a new driver process joins the cluster (the one
        # just started, or --address's) and prepares the same images again.
        import ray

        job = bench_prepare_job(root, out, rows_per_shard=args.rows_per_shard,
                                address=args.address or ray.get_runtime_context().gcs_address)
        if args.address:  # the cluster's processes are not this process's children: not counted
            job["cpu_seconds"] = float("nan")
        rows.append(_row("prepare", RUNNING_CLUSTER, job, cpus, "images/s"))
    if "loader" in stages:
        stage = f"loader {args.image_size}²"
        for label, r in bench_loader(out, image_size=args.image_size, batch_size=args.batch_size, text_cfg=text_cfg):
            rows.append(_row(stage, label, r, cpus, "samples/s"))
        if not args.skip_baseline:
            for label, r in baseline_loader(out, image_size=args.image_size, batch_size=args.batch_size,
                                            text_cfg=text_cfg):
                rows.append(_row(stage, label, r, 1, "samples/s"))
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
    import sys

    p = argparse.ArgumentParser(prog="python -m pipelines.bench.data", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
