"""How ``prepare`` cuts the work: shards (one Parquet file each) and their grouping into Ray tasks (no Ray)."""

from __future__ import annotations

from pipelines.prepare_shards import group_shards, plan_shards, shard_file_name


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
