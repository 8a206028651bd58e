"""How ``prepare`` cuts the work (shards, one Parquet file each, grouped into Ray tasks) and a
worker's pass over them; no Ray."""

from __future__ import annotations

from pipelines.data.shards import group_shards, plan_shards, shard_file_name


def test_shards_hold_one_split_each_in_image_order():
    tasks = [dict(split=s, image_id=i) for s, i in [("val", 9), ("train", 3), ("train", 1), ("val", 2), ("train", 2),
                                                     ("testA", 7), ("train", 5)]]
    ordered, shards = plan_shards(tasks, rows_per_shard=2)
    assert [(t["split"], t["image_id"]) for t in ordered] == [("testA", 7), ("train", 1), ("train", 2), ("train", 3),
                                                               ("train", 5), ("val", 2), ("val", 9)]
    assert shards == [("testA", 0, 0, 1), ("train", 0, 1, 3), ("train", 1, 3, 5), ("val", 0, 5, 7)]
    assert shard_file_name("train", 1) == "train-00001.parquet"


def test_groups_cover_every_shard_once_in_about_eight_tasks_per_cpu():
    for shards, cpus in [(313, 2), (20, 2), (3, 2), (1, 4), (1000, 16)]:
        groups = group_shards(shards, cpus)
        assert groups[0][0] == 0 and groups[-1][1] == shards
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(groups, groups[1:]))
        assert len(groups) == min(shards, 8 * cpus)
        sizes = [b - a for a, b in groups]
        assert max(sizes) - min(sizes) <= 1


def test_a_workers_shards_are_written_with_the_collector_off(tmp_path, monkeypatch):
    """A shard's task rows are thousands of lists and dicts, none in a cycle; with the
    collector on, each full collection would walk the worker's whole heap (``write_shards``).
    Written without it, and it is back on afterwards; the shards are still exact."""
    import gc
    import json

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines.data import shards as prepare_shards
    from pipelines.data.records import to_task_table

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.jpg")
    sample = dict(ref_id=1, sent_id=1, text="the red one", ann_ids=[7], no_target=False)
    tasks = [dict(image_id=i, split="train", path=str(tmp_path / name), width=40, height=30,
                  instances=[dict(ann_id=7, category_id=1, polygons=[[2.0, 2.0, 30.0, 2.0, 30.0, 20.0]],
                                  segmentation=None)],
                  samples=[sample]) for i, name in [(1, "a.jpg"), (2, "missing.jpg"), (3, "a.jpg")]]
    seen = []
    write_shard = prepare_shards.write_shard

    def noting(rows, **kwargs):
        seen.append(gc.isenabled())
        return write_shard(rows, **kwargs)

    monkeypatch.setattr(prepare_shards, "write_shard", noting)
    (tmp_path / "out" / "train").mkdir(parents=True)
    ordered, shards = plan_shards(tasks, rows_per_shard=2)
    stats = prepare_shards.write_shards(
        {"id": [0]}, tasks=to_task_table(ordered, str(tmp_path)), shards=shards, groups=[(0, len(shards))],
        fs=pafs.LocalFileSystem(), out_path=str(tmp_path / "out"), dataset="grefcoco", image_max_side=0,
        jpeg_quality=90).to_pylist()
    assert seen == [False, False] and gc.isenabled()
    assert [(r["shard"], r["file"], r["images"]) for r in stats] == [(0, "train-00000.parquet", 1),
                                                                      (1, "train-00001.parquet", 1)]
    assert [q["reason"] for q in json.loads(stats[0]["quarantine"])] == ["missing_image"]
    assert pq.read_table(tmp_path / "out" / "train" / "train-00001.parquet").column("image_id").to_pylist() == [3]
