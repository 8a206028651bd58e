"""Resource planning (``pipelines.resources``): the one CPU rule of train, tune, quickstart and evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_concurrency_leaves_room_for_data_and_respects_gpus():
    from pipelines.resources import TRIAL_CPU, data_cpus_per_task, default_cpus_per_worker, plan_concurrency

    assert data_cpus_per_task(0.5) == 0.5 and data_cpus_per_task(0.75) == 0.25 and data_cpus_per_task(2.0) == 1.0
    # 2 CPUs: two trials of one 0.45-CPU worker take 0.92 and leave a whole CPU for Ray Data's
    # reads; two 0.5-CPU ones would leave 0.98 — measured to hang (the read tasks take 1 CPU).
    assert plan_concurrency(total_cpus=2, total_gpus=0, num_workers=1, cpus_per_worker=0.45, gpus_per_worker=0,
                            max_concurrent=None) == 2
    with pytest.raises(ValueError, match=r"--max-concurrent 2 does not fit: .*0\.51 CPUs.*at most 1 at once"):
        plan_concurrency(total_cpus=2, total_gpus=0, num_workers=1, cpus_per_worker=0.5, gpus_per_worker=0,
                         max_concurrent=2)
    with pytest.raises(ValueError, match="not even one trial fits"):
        plan_concurrency(total_cpus=2, total_gpus=0, num_workers=2, cpus_per_worker=1.0, gpus_per_worker=0,
                         max_concurrent=None)
    # GPUs bound it: 8 GPUs, 2 workers × 1 GPU per trial → 4 trials, though 64 CPUs would fit more.
    assert plan_concurrency(total_cpus=64, total_gpus=8, num_workers=2, cpus_per_worker=1.0, gpus_per_worker=1,
                            max_concurrent=None) == 4
    with pytest.raises(ValueError, match="GPUs"):
        plan_concurrency(total_cpus=64, total_gpus=8, num_workers=2, cpus_per_worker=1.0, gpus_per_worker=1,
                         max_concurrent=5)
    # The derived CPU share keeps a CPU for data and the trial drivers' slivers on top.
    c = default_cpus_per_worker(1, total_cpus=2, concurrent=1, driver_cpus=TRIAL_CPU)
    assert c == 0.75 and plan_concurrency(total_cpus=2, total_gpus=0, num_workers=1, cpus_per_worker=c,
                                          gpus_per_worker=0, max_concurrent=1) == 1
    assert 2 - (TRIAL_CPU + c) >= 1
    assert default_cpus_per_worker(1, total_cpus=2, concurrent=1, driver_cpus=TRIAL_CPU, use_gpu=True) == 1.0


def test_one_default_share_for_train_and_tune():
    from pipelines.resources import (check_leaves_room_for_data, data_cpus_per_task, default_cpus_per_worker,
                                     plan_workers)

    # The 2-core dev machine: two workers take half a CPU each and leave one whole CPU to Ray
    # Data; a decode task then tiles each worker's CPU with the other half.
    assert default_cpus_per_worker(2, total_cpus=2) == 0.5 and data_cpus_per_task(0.5) == 0.5
    assert default_cpus_per_worker(1, total_cpus=2) == 1.0
    # Quarter-CPU steps, a quarter of the cluster kept, at most 4 per worker.
    assert default_cpus_per_worker(5, total_cpus=8) == 1.0 and default_cpus_per_worker(2, total_cpus=64) == 4.0
    # Too small for a quarter each: the workers share half the cluster.
    assert default_cpus_per_worker(1, total_cpus=1) == 0.5 and default_cpus_per_worker(8, total_cpus=2) == 0.125
    assert default_cpus_per_worker(4, total_cpus=16, use_gpu=True) == 1.0
    with pytest.raises(ValueError, match="no CPUs"):
        default_cpus_per_worker(1, total_cpus=0)
    with pytest.raises(ValueError, match="take all 2.0 CPUs"):
        check_leaves_room_for_data(2, 1.0, total_cpus=2)
    with pytest.raises(ValueError, match="> the cluster's 2.0 CPUs"):
        plan_workers(3, cpus_per_worker=1.0, total_cpus=2)
    r = plan_workers(2, total_cpus=2)
    assert (r.cpus_per_worker, r.data_cpus, r.per_worker()) == (0.5, 0.5, {"CPU": 0.5})
    g = plan_workers(2, gpus_per_worker=0.5, total_cpus=8)
    assert g.use_gpu and g.per_worker() == {"CPU": 1.0, "GPU": 0.5} and g.data_cpus == 1.0


def test_one_storage_rule(tmp_path, monkeypatch):
    from pipelines.resources import join_storage, storage_root

    monkeypatch.chdir(tmp_path)
    assert storage_root(None) == str(tmp_path / "ray_results")
    assert storage_root("runs") == str(tmp_path / "runs") and Path(storage_root("~/r")).is_absolute()
    assert storage_root("s3://bucket/runs") == "s3://bucket/runs"
    assert join_storage("s3://bucket/runs/", "job") == "s3://bucket/runs/job"
    assert join_storage(str(tmp_path), "job") == str(tmp_path / "job")
