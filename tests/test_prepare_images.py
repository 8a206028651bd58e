"""``process_task`` on damaged JPEGs, no Ray: a JPEG stored as its own bytes is checked with a
1/8-scale decode (``VERIFY_DRAFT``), which must refuse exactly what a full decode refuses."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image

from instalign.data.readers import read_source
from instalign.data.synthetic import generate_grefcoco
from pipelines.prepare_records import plan_tasks
from pipelines.prepare_shards import process_task


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("release")
    generate_grefcoco(root, num_images=2, seed=5)
    tasks, *_ = plan_tasks(read_source("grefcoco", str(root)), image_root=root)
    return tasks[0]


def _full_decode_fails(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - any refusal counts
        return True
    return False


def _damaged(data: bytes) -> list[bytes]:
    """Truncations (down to the end-of-image marker alone) and bytes overwritten in the entropy-coded data."""
    out = [data[:cut] for cut in (len(data) // 3, len(data) - 500, len(data) - 40, len(data) - 2)]
    for seed in range(12):
        rng, b = random.Random(seed), bytearray(data)
        for _ in range(40):
            b[rng.randrange(1000, len(b) - 2)] = rng.randrange(256)
        out.append(bytes(b))
    return out


def test_kept_jpeg_is_checked_like_a_full_decode(task, tmp_path):
    source = Path(task["path"]).read_bytes()
    row, records = process_task(task, dataset="grefcoco", image_max_side=0, jpeg_quality=90)
    assert records == [] and row["image"] == source  # stored as released, not re-encoded

    refused = 0
    for i, data in enumerate(_damaged(source)):
        path = tmp_path / f"damaged-{i}.jpg"
        path.write_bytes(data)
        row, records = process_task(dict(task, path=str(path)), dataset="grefcoco", image_max_side=0, jpeg_quality=90)
        quarantined = [r["reason"] for r in records] == ["corrupt_image"]
        assert quarantined == _full_decode_fails(data), (i, records)
        assert quarantined or row["image"] == data
        refused += quarantined
    assert refused >= 5  # every truncation, and some of the overwritten streams
