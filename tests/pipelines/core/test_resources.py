"""Resource planning (``pipelines.core.resources``): the one CPU rule of train, tune, quickstart and evaluate."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest


def test_concurrency_leaves_room_for_data_and_respects_gpus():
    from pipelines.core.resources import TRIAL_CPU, data_cpus_per_task, default_cpus_per_worker, plan_concurrency

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
    from pipelines.core.resources import (check_leaves_room_for_data, data_cpus_per_task, default_cpus_per_worker,
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
        plan_workers(3, cpus_per_worker=1.0, cluster={"CPU": 2})
    r = plan_workers(2, cluster={"CPU": 2})
    assert (r.cpus_per_worker, r.data_cpus, r.per_worker()) == (0.5, 0.5, {"CPU": 0.5})
    g = plan_workers(2, gpus_per_worker=0.5, cluster={"CPU": 8, "GPU": 1})
    assert g.use_gpu and g.per_worker() == {"CPU": 1.0, "GPU": 0.5} and g.data_cpus == 1.0


def test_gpu_workers_by_default_when_the_cluster_has_gpus():
    """``--gpus-per-worker`` unset: 1 GPU per worker on a GPU cluster, CPU workers without GPUs,
    CPU when 0 is asked; each plan is said in one line at the run's start."""
    from pipelines.core.resources import describe_workers, plan_workers, resolve_gpus_per_worker

    gpu_cluster = {"CPU": 64.0, "GPU": 8.0, "memory": 5e11, "node:10.0.0.1": 1.0}
    g = plan_workers(4, cluster=gpu_cluster)
    assert (g.use_gpu, g.gpus_per_worker, g.cpus_per_worker) == (True, 1.0, 1.0)
    assert g.per_worker() == {"CPU": 1.0, "GPU": 1.0}
    assert describe_workers(g, gpu_cluster, requested_gpus=None) == \
        "training on GPU: 4 workers × 1 GPU + 1 CPU each (cluster: 8 GPUs, 64 CPUs)"

    cpu_cluster = {"CPU": 2.0, "memory": 2e10}
    c = plan_workers(2, cluster=cpu_cluster)
    assert (c.use_gpu, c.gpus_per_worker, c.per_worker()) == (False, 0.0, {"CPU": 0.5})
    assert describe_workers(c, cpu_cluster, requested_gpus=None) == \
        "training on CPU: 2 workers × 0.5 CPU (the cluster has no GPUs; 2 CPUs)"

    asked = plan_workers(4, gpus_per_worker=0, cluster=gpu_cluster)  # --gpus-per-worker 0 on a GPU cluster
    assert (asked.use_gpu, asked.gpus_per_worker, asked.per_worker()) == (False, 0.0, {"CPU": 4.0})
    assert describe_workers(asked, gpu_cluster, requested_gpus=0) == \
        "training on CPU: 4 workers × 4 CPU (--gpus-per-worker 0; the cluster's 8 GPUs stay unused)"

    # More GPU workers than GPUs: planned as asked (an autoscaler may add nodes) and said.
    many = plan_workers(16, cluster=gpu_cluster)
    assert many.use_gpu and "16 GPUs asked, more than the cluster has now" in describe_workers(
        many, gpu_cluster, requested_gpus=None)
    assert resolve_gpus_per_worker(0.5, 0.0) == 0.5 and resolve_gpus_per_worker(None, 0.0) == 0.0
    with pytest.raises(ValueError, match="--gpus-per-worker must be >= 0, got -1"):
        resolve_gpus_per_worker(-1, 8)


def test_tune_trials_follow_the_same_gpu_default():
    from pipelines.tuning.tune import plan_trials

    gpu_cluster = {"CPU": 64.0, "GPU": 8.0}
    r, n = plan_trials(workers_per_trial=2, gpus_per_worker=None, cpus_per_worker=None, max_concurrent=None,
                       joined=False, cluster=gpu_cluster)
    assert (r.use_gpu, r.gpus_per_worker, r.cpus_per_worker, n) == (True, 1.0, 1.0, 4)  # 8 GPUs / (2 × 1)
    r, n = plan_trials(workers_per_trial=2, gpus_per_worker=0, cpus_per_worker=None, max_concurrent=None,
                       joined=False, cluster=gpu_cluster)
    assert (r.use_gpu, n) == (False, 1)
    r, n = plan_trials(workers_per_trial=1, gpus_per_worker=None, cpus_per_worker=None, max_concurrent=None,
                       joined=False, cluster={"CPU": 2.0})
    assert (r.use_gpu, r.cpus_per_worker, n) == (False, 0.75, 1)


def test_the_cli_default_is_auto_and_0_means_cpu():
    from pipelines.cli import build_parser

    for verb in ("train", "tune"):
        base = [verb, "--data", "/d"] + (["--space", "s.yaml"] if verb == "tune" else [])
        assert build_parser(verb).parse_args(base).gpus_per_worker is None
        assert build_parser(verb).parse_args(base + ["--gpus-per-worker", "0"]).gpus_per_worker == 0.0
        assert build_parser(verb).parse_args(base + ["--log-level", "debug"]).log_level == "DEBUG"


def test_every_verb_takes_log_level_and_sets_rays_before_it_starts(tmp_path, monkeypatch):
    """``--log-level`` is one flag of every verb; the CLI applies it (Ray's level, kept in the
    environment for the cluster's processes) before the verb runs."""
    import argparse

    from pipelines.cli import VERBS, build_parser, main
    from pipelines.core.ray_logs import LOG_LEVEL_ENV

    for verb in VERBS:
        sub = next(a for a in build_parser(verb)._actions if isinstance(a, argparse._SubParsersAction))
        assert "--log-level" in sub.choices[verb]._option_string_actions, verb
    monkeypatch.setenv(LOG_LEVEL_ENV, "WARNING")
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "WARNING")
    monkeypatch.setattr("pipelines.data.prepare.init_ray", lambda *a, **k: pytest.fail("the release is refused first"))
    argv = ["prepare", "--dataset", "grefcoco", "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]
    prepare_log = logging.getLogger("instalign.prepare")
    monkeypatch.setattr(prepare_log, "level", prepare_log.level)  # restored afterwards
    assert main(argv + ["--log-level", "debug"]) == 1
    assert os.environ[LOG_LEVEL_ENV] == os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"
    assert prepare_log.level == logging.DEBUG


def test_one_storage_rule(tmp_path, monkeypatch):
    from pipelines.core.resources import join_storage, storage_root

    monkeypatch.chdir(tmp_path)
    assert storage_root(None) == str(tmp_path / "ray_results")
    assert storage_root("runs") == str(tmp_path / "runs") and Path(storage_root("~/r")).is_absolute()
    assert storage_root("s3://bucket/runs") == "s3://bucket/runs"
    assert join_storage("s3://bucket/runs/", "job") == "s3://bucket/runs/job"
    assert join_storage(str(tmp_path), "job") == str(tmp_path / "job")
