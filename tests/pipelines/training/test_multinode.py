"""Data-parallel training on a real 2-node Ray cluster equals single-worker training.

Two Ray nodes on this machine (``ray.cluster_utils.Cluster``, 2 logical CPUs each: a
worker takes 0.5 and Ray Data's Parquet read tasks need a whole CPU beside it, or the val
pipeline can never be scheduled). Two workers spread over them must end with the same
parameters as one worker after the same number of steps. What makes the comparison honest:

* the same init: every rank seeds ``train.seed`` before building the model;
* the same global batches: ``data_order="ordered"`` gives every rank the same seeded order
  and each rank keeps its half of each global batch of 8 (streaming splits are decided at
  run time and could never match);
* the same objective: DDP averages the two half-batch gradients; the criterion's terms
  are batch means or normalised by instances averaged over workers, so the average equals
  the full-batch gradient. The one per-rank random element, the point sampling of the
  mask BCE/dice (eqs. 5–7), is switched off with ``loss.mask_weight=0`` — every other term
  (merged mask eq. 9, score, phrase eq. 3, no-target) is compared;
* fp32 on CPU and no per-sample randomness in the forward pass: the tiny model's dropouts
  are 0, and Swin's stochastic depth (timm's default ``drop_path_rate=0.1``) is turned off;
  no BatchNorm either (Swin and the decoder use LayerNorm/GroupNorm, which do not mix
  samples across the batch).

Only what is deterministic is compared. Two reductions in another order differ in the last
bits, and AdamW turns such noise on a near-zero gradient into a full step of ``lr`` (its
update is ``m / sqrt(v)``, about ±1 whatever the gradient's size): after a few steps the two
runs' parameters and losses drift apart for no fault of the code (a 0.7 % loss difference
at step 6 failed a correct tree once). So the optimiser's steps are made negligible
(``lr = 1e-12``: far below an fp32 ulp of any weight that matters), which keeps every step's
loss a function of the same weights and the same global batch: all six steps' losses and
gradient norms (DDP's averaged gradient) must then agree to float-summation noise
(1e-5 relative, measured ≤ 1e-6); a wrong batch split, a summed instead of averaged
gradient or a wrong instance normaliser is off by ≥ 1e-2. That the optimiser then applies
the averaged gradient is torch's AdamW, exercised by every other training test.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from instalign.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_samples(path: Path) -> dict[int, list[str]]:
    return {r["step"]: r["sample_ids"] for r in read_jsonl(path) if "step" in r}


@pytest.mark.ray
@pytest.mark.own_cluster
def test_two_nodes_two_workers_equal_one_worker(prepared_dataset, tmp_path):
    import ray
    import torch
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster
    from safetensors.torch import load_file

    from instalign.modeling.builders import build_model
    from pipelines.training.train import train
    from tests.support.worker_hooks import SampleLog, observing

    cfg = load_config("tiny", ["data.max_train_samples=32", "data.max_val_samples=6", "data.num_overlays=0",
                               "train.epochs=2", "train.batch_size=8", "train.max_steps=6", "train.log_every_steps=1",
                               "train.precision=fp32", "loss.mask_weight=0", "loss.num_points=256",
                               "model.backbone.kwargs.drop_path_rate=0.0", "train.lr=1.0e-12", "train.min_lr=1.0e-12"])
    ray.shutdown()  # this test owns the cluster; the ray_local fixture starts a fresh one when next used
    # The dashboard (Train's State API) on a free port: the default 8265 may belong to another cluster.
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, include_dashboard=True,
                                                                dashboard_host="127.0.0.1", dashboard_port=free_port()))
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        common = dict(cpus_per_worker=0.5, data_order="ordered", storage_path=str(tmp_path / "ray"),
                      experiment="test-multinode", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", max_failures=0)
        with observing(SampleLog(tmp_path / "two")):
            two = train(cfg, str(prepared_dataset), num_workers=2, placement_strategy="SPREAD", name="two", **common)
        with observing(SampleLog(tmp_path / "one")):
            one = train(cfg, str(prepared_dataset), num_workers=1, name="one", **common)
    finally:
        ray.shutdown()
        cluster.shutdown()

    # Placement: one worker per node.
    starts = [read_jsonl(tmp_path / "two" / f"rank{r}.jsonl")[0] for r in (0, 1)]
    assert starts[0]["node_id"] != starts[1]["node_id"]

    # Data: each step's global batch is the single worker's batch, split without overlap;
    # no sample twice within an epoch (4 steps per epoch; steps 5-6 start epoch 1).
    r0, r1, single = (step_samples(tmp_path / "two" / "rank0.jsonl"), step_samples(tmp_path / "two" / "rank1.jsonl"),
                      step_samples(tmp_path / "one" / "rank0.jsonl"))
    assert sorted(r0) == sorted(r1) == sorted(single) == [1, 2, 3, 4, 5, 6]
    for step in single:
        assert len(r0[step]) == len(r1[step]) == 4 and not set(r0[step]) & set(r1[step])
        assert sorted(r0[step] + r1[step]) == sorted(single[step])
    for epoch_steps in ([1, 2, 3, 4], [5, 6]):
        seen = [i for s in epoch_steps for i in r0[s] + r1[s]]
        assert len(seen) == len(set(seen))
    assert [single[s] for s in (1, 2)] != [single[s] for s in (5, 6)]  # the epoch-seeded shuffle moved

    # Every step's loss is the same function of the same weights and the same global batch;
    # the ranks' window means average to the full-batch value (module docstring).
    client = MlflowClient(tracking_uri=common["tracking_uri"])
    for key in ("loss", "loss_merged", "loss_inst", "loss_nt", "grad_norm"):
        curves = [[m.value for m in sorted(client.get_metric_history(r.mlflow_run_id, key), key=lambda m: m.step)]
                  for r in (two, one)]
        assert len(curves[0]) == len(curves[1]) == 6, key
        assert curves[0] == pytest.approx(curves[1], rel=1e-5), key
    # A different batch would not pass: consecutive steps' losses differ by far more than that.
    single_losses = [m.value for m in sorted(client.get_metric_history(one.mlflow_run_id, "loss"),
                                             key=lambda m: m.step)]
    assert max(abs(a / b - 1) for a, b in zip(single_losses, single_losses[1:])) > 1e-3

    # Both checkpoints hold the same weights: the same seeded init on every rank.
    w2 = load_file(str(Path(two.last_checkpoint) / "model.safetensors"))
    w1 = load_file(str(Path(one.last_checkpoint) / "model.safetensors"))
    assert w2.keys() == w1.keys()
    worst = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    assert worst < 1e-6, worst
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    assert all(torch.allclose(w1[k], init[k], rtol=0, atol=1e-6) for k in w1 if k in init)
    # Validation covered every val sample on both (equal=False split: nothing dropped).
    assert two.metrics["val_samples"] == one.metrics["val_samples"] == 6
