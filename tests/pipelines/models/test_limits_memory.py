"""Memory of a real ``mlflow models serve`` process under concurrent large requests stays bounded.

Issue 11 measured 8 concurrent 5900×5900 JPEGs taking an unbounded server from 1.6 to 4.2 GB.
Here a tiny registered model is served on loopback with small limits (one prediction at a time,
3 Mpx per request, 4 rows) and hit by 12 concurrent requests at once: 8 that fill the pixel
budget (2 rows of 1200×1200) and 4 over it. The server's peak resident memory during the
burst (``VmHWM`` of the server's processes, reset after a warm-up request) must stay within
what one request in flight may use:

    bound = max_concurrent × max_pixels × (BYTES_PER_PIXEL + 3·N) + SLACK

per decoded pixel: 3 B for the RGB image, ~14 B for the merged mask at full size (float32
logits and probability, the kept probability map, the bool mask), 4 B for the float32
logits of the one instance being upsampled (the predictor does them one at a time), and per
kept instance (≤ N queries; this checkpoint keeps all N = 8) 1 B of mask as upsampled, 1 B
for its copy in the one host buffer ``predictor.to_host`` fills (on a GPU the first lives on
the device; here the device is the host) and ~1 B for its RLE encoding; SLACK covers request
parsing, thread stacks and allocator rounding.
An unbounded server runs up to ``min(32, CPUs + 4)`` predictions at once (MLflow's thread
pool), several times that bound. The over-budget requests must be 413 without being decoded,
and the server must answer normally afterwards.
"""

from __future__ import annotations

import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.mlflow_store import tracking_store
from tests.support.model_server import invoke, model_server
from tests.support.tiny_checkpoint import make_checkpoint

pytestmark = pytest.mark.slow

MODEL_NAME = "instalign-serving-memory"
SIDE = 1200  # px; two such images fill the budget below
LIMITS = {"INSTALIGN_SERVING_MAX_CONCURRENT": "1", "INSTALIGN_SERVING_MAX_PIXELS": str(3_000_000),
          "INSTALIGN_SERVING_MAX_ROWS": "4", "INSTALIGN_SERVING_QUEUE_TIMEOUT_S": "120"}
NUM_QUERIES = 8  # tiny config's N: the most instances one image can report
BYTES_PER_PIXEL = 22
SLACK = 96 * 2**20
BOUND = 1 * 3_000_000 * (BYTES_PER_PIXEL + 3 * NUM_QUERIES) + SLACK  # ≈ 228 MiB


def jpeg(side: int, seed: int) -> str:
    """A smooth photo-like JPEG (small on the wire, ``side``² pixels once decoded), base64."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                    np.full((side, side), (seed * 37) % 255, np.float32)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    """Set ``VmHWM`` back to the current ``VmRSS`` (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from pipelines.models.registry import log_and_register

    root = tmp_path_factory.mktemp("serving_memory")
    with tracking_store(root, "serving-memory") as tracking_uri:
        # Biased so that every query is a kept instance: the most full-size masks per image.
        log_and_register(make_checkpoint(root / "ckpt", score_bias=4.0, no_target_bias=-4.0),
                         registered_model_name=MODEL_NAME, alias="champion")
    return tracking_uri, root


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_concurrent_large_requests_keep_memory_bounded(registered):
    tracking_uri, root = registered
    full = [[jpeg(SIDE, k), "the bright corner"] for k in range(2)]  # 2.88 Mpx: fills the budget
    over = full + [[jpeg(SIDE, 2), "and the rest"]]  # 4.32 Mpx: refused
    with model_server(f"models:/{MODEL_NAME}@champion", tracking_uri, root / "server.log", env=LIMITS) as (url, proc):
        status, body = invoke(url, ["image", "text"], full)  # warm-up: first-use allocations happen here
        assert status == 200, body
        assert len(body["predictions"][0]["instances"]) == NUM_QUERIES  # the worst case is what is measured
        pids = process_tree(proc.pid)
        for pid in pids:
            reset_peak(pid)
        before = {pid: status_kib(pid, "VmRSS") for pid in pids}

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda rows: invoke(url, ["image", "text"], rows, timeout=300),
                                    [full] * 8 + [over] * 4))
        burst_s = time.monotonic() - started
        growth = max(status_kib(pid, "VmHWM") - before[pid] for pid in pids) * 1024
        after = max(status_kib(pid, "VmRSS") - before[pid] for pid in pids) * 1024

        served = [body for status, body in answers if status == 200]
        refused = [body for status, body in answers if status == 413]
        assert len(served) == 8 and len(refused) == 4, [(s, str(b)[:300]) for s, b in answers]
        assert all(p["mask"]["size"] == [SIDE, SIDE] for body in served for p in body["predictions"])
        assert all("decode to more than 3000000 pixels" in body["message"] for body in refused)
        print(f"\nserver RSS before {max(before.values()) / 1024:.0f} MiB; burst of 12 requests in {burst_s:.1f} s: "
              f"peak +{growth / 2**20:.0f} MiB (bound {BOUND / 2**20:.0f} MiB), after +{after / 2**20:.0f} MiB")
        assert growth <= BOUND, f"peak grew by {growth / 2**20:.0f} MiB, above the bound of {BOUND / 2**20:.0f} MiB"
        # Freed memory goes back to the OS (malloc_trim after each prediction).
        assert after <= BOUND / 2, f"resident memory stayed {after / 2**20:.0f} MiB above its level before the burst"

        status, body = invoke(url, ["image", "text"], [[jpeg(64, 9), "still there?"]])  # keeps serving
        assert status == 200 and body["predictions"][0]["mask"]["size"] == [64, 64]
