"""The driver's task rows and ``process_task``, no Ray: segmentations survive the task table
whatever their form, a JPEG stored as its own bytes is checked with a 1/8-scale decode
(``VERIFY_DRAFT``), which must refuse exactly what a full decode refuses, and a file in a
format outside the allow-list is quarantined (and, with Ray, a whole ``prepare`` run goes on)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instalign.data.readers import read_source
from instalign.data.synthetic import generate_grefcoco
from instalign.data.source import Annotation
from pipelines.data.records import _task_instance, plan_tasks, task_segmentation, to_task_table
from pipelines.data.shards import process_task
from tests.support.hostile_images import OTHER_FORMATS, dds_header


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


SEGMENTATIONS = {
    "polygons": [[1, 1, 6.5, 1, 6, 6], [0.25, 7, 3, 7, 2, 5]],
    "compressed_rle": {"size": [8, 8], "counts": "P1"},
    "uncompressed_rle": {"size": [8, 8], "counts": [10, 20, 34]},
    "numpy_scalars": [[np.float32(1.5), np.int64(1), 6.0, 1, 6, 6]],
    "bool_coordinate": [[True, 1, 6, 1, 6, 6]],
    "string_coordinate": [[1, "1", 6, 1, 6, 6]],
    "nested_points": [[[1, 1], [6, 1], [6, 6]]],
}


@pytest.mark.parametrize("kind", SEGMENTATIONS)
def test_segmentations_survive_the_task_table(kind, task):
    seg = SEGMENTATIONS[kind]
    inst = _task_instance(Annotation(ann_id=7, image_id=1, category_id=3, segmentation=seg))
    assert (inst["polygons"] is not None) == (kind == "polygons")  # only plain JSON numbers go as Arrow lists
    row = to_task_table([dict(task, instances=[inst])], "root").to_pylist()[0]
    back = task_segmentation(row["instances"][0])
    assert back == (seg if kind != "numpy_scalars" else [[1.5, 1, 6.0, 1, 6, 6]])
    if kind == "polygons":
        assert all(type(v) is float for poly in back for v in poly)  # float64 in Arrow, ints included


def test_a_malformed_polygon_is_quarantined_by_the_worker(task):
    bad = _task_instance(Annotation(ann_id=task["instances"][0]["ann_id"], image_id=task["image_id"],
                                    category_id=1, segmentation=SEGMENTATIONS["string_coordinate"]))
    row = to_task_table([dict(task, instances=[bad] + task["instances"][1:])], "root").to_pylist()[0]
    _, records = process_task(row, dataset="grefcoco", image_max_side=0, jpeg_quality=90)
    assert "invalid_segmentation" in [r["reason"] for r in records]
    assert "not a flat list of numbers" in next(r["detail"] for r in records if r["reason"] == "invalid_segmentation")


@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_an_image_in_another_format_is_quarantined_by_the_worker(name, task, tmp_path):
    """A DDS header made Pillow raise ``NotImplementedError`` out of ``process_task``."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(OTHER_FORMATS[name])
    row, records = process_task(dict(task, path=str(path)), dataset="grefcoco", image_max_side=0, jpeg_quality=90)
    assert [r["reason"] for r in records] == ["unsupported_image_format"] and not row["_keep"]
    detail = records[0]["detail"]
    assert f"unsupported image format (its signature is {name}'s" in detail and str(path) in detail
    assert "\n" not in detail


@pytest.mark.ray
def test_prepare_quarantines_a_dds_file_and_finishes(ray_local, tmp_path):
    from pipelines.data.prepare import prepare_dataset

    src = tmp_path / "src"
    generate_grefcoco(src, num_images=3, seed=4)
    victim = sorted((src / "images" / "train2014").iterdir())[0]
    victim.write_bytes(dds_header())
    manifest = prepare_dataset(dataset="grefcoco", root=src, out=str(tmp_path / "out"), progress=False)
    assert manifest["quarantined"] == {"unsupported_image_format": 1}
    assert sum(c["images"] for c in manifest["counts"].values()) == 2
