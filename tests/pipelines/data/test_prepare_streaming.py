"""``prepare`` streams (issue 16): a release larger than the object store prepares without spilling.

A private Ray cluster with a deliberately small object store (80 MiB, Ray's minimum is 75)
prepares ~112 MiB of JPEGs. The old design materialised every stored image in the object
store: on this very test it spilled 126 MiB and restored 181 MiB (measured 2026-11-30). The
streaming pass writes each shard from the task that processed it, so image bytes never
enter the store: 0 bytes spilled. Ray's own counters say what
spilled (``store_stats.spilled_bytes_total``, what ``ray memory --stats-only`` prints).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from instalign.data.records import MANIFEST_NAME
from pipelines.bench.coco_like import make_coco_like
from pipelines.data.prepare import prepare_dataset

pytestmark = pytest.mark.ray

STORE_BYTES = 80 * 1024 * 1024
NUM_IMAGES = 120  # ~117 MB of JPEGs


@pytest.fixture
def small_store_ray(_ray_session_guard):
    """A private 2-CPU cluster with an 80 MiB object store; shut down afterwards, so the next
    ``ray_local`` user starts its usual cluster again."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, object_store_memory=STORE_BYTES, logging_level="ERROR",
             log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


def _store_stats():
    """This cluster's object store counters (by its GCS address: other clusters may run on the machine)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats


def _noisy_release(root, num_images: int) -> int:
    """A gRefCOCO-layout release whose 640×480 images are full-range noise (~1 MB each as
    JPEG, about 6× a COCO photo): many bytes for little decoding. Returns their total size."""
    make_coco_like(root, num_images=num_images, instances=3)
    rng = np.random.default_rng(0)
    total = 0
    for path in sorted((root / "images" / "train2014").iterdir()):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=98, subsampling=0)
        total += path.stat().st_size
    return total


def test_release_larger_than_the_object_store_prepares_without_spilling(small_store_ray, tmp_path):
    root, out = tmp_path / "release", tmp_path / "out"
    image_bytes = _noisy_release(root, num_images=NUM_IMAGES)
    assert image_bytes > 1.2 * STORE_BYTES  # the point of the test: the images cannot all fit
    assert _store_stats().spilled_bytes_total == 0

    manifest = prepare_dataset(dataset="grefcoco", root=str(root), out=str(out), rows_per_shard=16, progress=False)

    stats = _store_stats()
    # The stored images are the source bytes (no resize), so the output is at least as large.
    stored = sum(manifest["file_sizes"][f"train/{name}"] for name in manifest["files"]["train"])
    assert stored >= image_bytes
    # Only shard statistics and the task table passed through the store; the old
    # materialise-then-write design spilled everything beyond 80 MiB here.
    assert stats.spilled_bytes_total < 0.1 * image_bytes, stats
    assert stats.object_store_bytes_fallback == 0, stats

    assert manifest["counts"]["train"]["images"] == NUM_IMAGES and manifest["quarantined"] == {}
    assert manifest["files"]["train"] == [f"train-{i:05d}.parquet" for i in range(math.ceil(NUM_IMAGES / 16))]
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    ids = [i for name in manifest["files"]["train"]
           for i in pq.read_table(out / "train" / name, columns=["image_id"]).column("image_id").to_pylist()]
    assert sorted(ids) == ids and len(set(ids)) == NUM_IMAGES  # every image once, shards in image order
    first = pq.read_table(out / "train" / manifest["files"]["train"][0]).slice(0, 1).to_pylist()[0]
    name = f"COCO_train2014_{first['image_id']:012d}.jpg"
    assert first["image"] == (root / "images" / "train2014" / name).read_bytes()


def _kill_first_busy_shard_writer(killed: list, stop) -> None:
    """SIGKILL the first ``ShardWriter`` actor process seen running a task (Ray titles it
    ``ray::MapWorker(…ShardWriter)).submit`` meanwhile): what the kernel's OOM killer does.
    Only among this process's descendants (the test's local cluster): never another run's worker."""
    import psutil

    me = psutil.Process()
    while not stop.is_set() and not killed:
        for proc in me.children(recursive=True):
            try:
                title = " ".join(proc.cmdline()).strip()  # Ray pads its process titles
            except psutil.Error:  # exited meanwhile
                continue
            if title.startswith("ray::MapWorker(") and "ShardWriter)).submit" in title:
                proc.kill()
                killed.append(proc.pid)
                return
        stop.wait(0.01)


@pytest.mark.timeout(300)  # with restarts off, Ray Data waited forever on the dead actor (measured)
def test_a_shard_writer_killed_mid_task_is_restarted_and_every_shard_is_written(ray_local, tmp_path):
    """The pass's actors restart and their tasks are retried (Ray Data's defaults for actor
    pools: ``max_restarts=-1``, ``max_task_retries=-1``): a worker killed in the middle of a
    shard costs a retry, not the run, and the retried shard is rewritten whole."""
    import threading

    root, out = tmp_path / "release", tmp_path / "out"
    num_images = 48
    _noisy_release(root, num_images=num_images)  # ~1 MB noise JPEGs: tasks long enough to be caught running
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_busy_shard_writer, args=(killed, stop), daemon=True)
    killer.start()
    try:
        manifest = prepare_dataset(dataset="grefcoco", root=str(root), out=str(out), rows_per_shard=2, progress=False)
    finally:
        stop.set()
        killer.join()

    assert killed, "no ShardWriter was caught running a task: the test did not test anything"
    assert manifest["counts"]["train"]["images"] == num_images and manifest["quarantined"] == {}
    assert manifest["files"]["train"] == [f"train-{i:05d}.parquet" for i in range(num_images // 2)]
    ids = [i for name in manifest["files"]["train"]
           for i in pq.read_table(out / "train" / name, columns=["image_id"]).column("image_id").to_pylist()]
    assert sorted(ids) == ids and len(set(ids)) == num_images == len(ids)
    sizes = {name: (out / "train" / name).stat().st_size for name in manifest["files"]["train"]}
    assert sizes == {name: manifest["file_sizes"][f"train/{name}"] for name in manifest["files"]["train"]}
