"""How ``instalign serve`` batches and which device its replicas use, decided without a cluster.

* A lone request waits at most 2 ms for a batch to fill by default (``--batch-wait-ms``; issue
  28: 1–2 ms), in the flag, the application ``build_app`` binds and a Serve config's builder.
* Replicas ask Ray for one GPU each when the cluster advertises GPUs, none otherwise, and
  ``--gpus-per-replica`` overrides; a CPU cluster's deployment is the one deployed before
  (no ``num_gpus``). A replica runs on CUDA exactly when Ray assigned it a GPU.

The deployed replica reports the same values over HTTP (``/stats``:
``test_serve.test_the_serve_verb_serves_until_interrupted``).
"""

from __future__ import annotations

import argparse
import logging

import pytest

from pipelines.serving.serve import (DEFAULT_BATCH_WAIT_S, add_arguments, app_builder, build_app, replica_device,
                                     resolve_gpus_per_replica)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "models:/m@champion", *argv])


def _deployment(app):
    return app._bound_deployment  # Serve's Application keeps the bound deployment here (no public accessor)


def test_a_lone_request_waits_at_most_two_milliseconds_by_default():
    assert _args().batch_wait_ms == 2.0 and DEFAULT_BATCH_WAIT_S == 0.002
    assert _args("--batch-wait-ms", "0.5").batch_wait_ms == 0.5
    # model, tracking URI, max batch size, batch wait (s), top words: what each replica is built with
    assert _deployment(build_app("/some/checkpoint")).init_args[3] == 0.002
    assert _deployment(app_builder({"model": "/some/checkpoint"})).init_args[3] == 0.002


def test_the_flags_help_shows_the_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: 2;" in text  # --batch-wait-ms
    assert "default: 1 when the cluster has GPUs, else 0" in text  # --gpus-per-replica


@pytest.mark.parametrize("cluster, requested, want", [
    ({"CPU": 2.0, "GPU": 0.0}, None, 0.0),  # this machine: CPU replicas, as before
    ({"CPU": 64.0, "GPU": 8.0}, None, 1.0),  # a GPU cluster: a GPU each
    ({"CPU": 16.0, "GPU": 1.0}, None, 1.0),
    ({"CPU": 64.0, "GPU": 8.0}, 0.0, 0.0),  # --gpus-per-replica 0: CPU on purpose
    ({"CPU": 2.0, "GPU": 0.0}, 1.0, 1.0),  # GPU nodes still to come (an autoscaler's): asked for
    ({"CPU": 64.0, "GPU": 8.0}, 0.5, 0.5),  # two replicas per GPU
])
def test_replicas_take_a_gpu_each_when_the_cluster_has_gpus(cluster, requested, want):
    assert resolve_gpus_per_replica(requested, cluster) == want
    assert _args().gpus_per_replica is None  # the flag's default leaves it to the cluster


def test_a_negative_gpu_request_is_refused():
    with pytest.raises(ValueError, match="--gpus-per-replica must be >= 0"):
        resolve_gpus_per_replica(-1.0, {"CPU": 2.0, "GPU": 0.0})


def test_the_deployment_reserves_the_gpus_it_was_given_and_a_cpu_one_none():
    gpu = _deployment(build_app("/some/checkpoint", gpus_per_replica=1.0)).ray_actor_options
    cpu = _deployment(build_app("/some/checkpoint", gpus_per_replica=0.0, cpus_per_replica=0.5)).ray_actor_options
    assert gpu["num_gpus"] == 1.0 and gpu["num_cpus"] == 1.0
    assert "num_gpus" not in cpu and cpu["num_cpus"] == 0.5  # the CPU deployment as before


def test_a_replica_runs_on_cuda_exactly_when_ray_gave_it_a_gpu(caplog):
    assert replica_device([], cuda_available=False) == "cpu"
    assert replica_device([], cuda_available=True) == "cpu"  # a GPU node, but no GPU reserved: not shared
    assert replica_device(["0"], cuda_available=True) == "cuda"
    with caplog.at_level(logging.WARNING, logger="pipelines.serving.serve"):
        assert replica_device(["0"], cuda_available=False) == "cpu"  # a CPU build of torch: said, not hidden
    assert "torch sees no CUDA device" in caplog.text
