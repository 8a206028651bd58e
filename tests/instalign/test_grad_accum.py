"""``train.grad_accum_steps``: micro-batches accumulated into one optimizer step.

Two micro-batches of 4 must give the step one batch of 8 gives: the same gradient and
the same logged losses. What makes it comparable: fp32 on CPU, no per-sample randomness
in the forward (dropouts 0, Swin's stochastic depth off) and the one random element of
the objective, the point sampling of the mask BCE/dice, weighted 0 (``loss.mask_weight=0``,
as tests/pipelines/training/test_multinode.py does); every other term (merged mask eq. 9, score, unmatched,
phrase eq. 3, no-target) is compared. The micro-batches hold different numbers of
instances (1 and 4), so a per-micro-batch instance normaliser (eq. 7) would be off by far
more than the tolerance, and so would summed instead of averaged per-sample means.
"""

from __future__ import annotations

import copy

import pytest
import torch

from instalign.config import ConfigError, load_config, tiny
from instalign.data.batch import Batch
from instalign.data.transforms import GRESTransform
from instalign.engine import train_one_epoch
from instalign.losses import build_criterion
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer
from tests.support.scenes import scene_batch

pytestmark = pytest.mark.usefixtures("one_thread")

OVERRIDES = ["loss.nt_pos_weight=1", "loss.mask_weight=0", "model.backbone.kwargs.drop_path_rate=0.0"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(tiny(), OVERRIDES)
    transform = GRESTransform(image_size=cfg.model.image_size, max_tokens=cfg.model.text_encoder.max_tokens,
                              tokenizer=load_tokenizer(cfg.model.text_encoder))
    batch = scene_batch(transform, 7, n=8)
    for i in range(3):  # samples 0-2 say "no target": the first half holds 1 instance, the second 4
        batch.instance_masks[i] = batch.instance_masks[i][:0]
        batch.union_masks[i] = False
        batch.no_target[i] = True
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), batch


def halves(batch: Batch) -> list[Batch]:
    def part(lo, hi):
        return Batch(images=batch.images[lo:hi], input_ids=batch.input_ids[lo:hi],
                     attention_mask=batch.attention_mask[lo:hi], instance_masks=batch.instance_masks[lo:hi],
                     union_masks=batch.union_masks[lo:hi], no_target=batch.no_target[lo:hi],
                     sample_ids=batch.sample_ids[lo:hi])
    return [part(0, 4), part(4, 8)]


def one_step(cfg, model, batches, accum: int):
    """One optimizer step (SGD, lr 0: the gradients stay in ``.grad``); its report and grads."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    reports = []
    step = train_one_epoch(model, build_criterion(cfg.loss), optimizer, None, batches, device="cpu",
                           precision="fp32", grad_clip=0.0, report=lambda m, s: reports.append((s, m)),
                           log_every=1, grad_accum_steps=accum)
    return step, reports, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_micro_batches_of_4_equal_one_batch_of_8(setup):
    cfg, model, batch = setup
    full_step, (full,), full_grads = one_step(cfg, model, [batch], accum=1)
    acc_step, (acc,), acc_grads = one_step(cfg, model, halves(batch), accum=2)
    assert full_step == acc_step == 1 and full[0] == acc[0] == 1  # one optimizer step, counted once
    for key in ("loss", "loss_merged", "loss_nt", "loss_inst", "loss_score", "loss_unmatched", "loss_phrase",
                "grad_norm"):
        assert acc[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-7), key
    assert acc_grads.keys() == full_grads.keys()
    # Relative to each parameter's largest gradient, floored at 1e-6: the attention key biases'
    # true gradient is 0 (softmax is shift-invariant), what they get (~1e-11) is rounding noise.
    worst = max(((acc_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item()
                for n, g in full_grads.items())
    assert worst < 1e-5, worst
    # Without the shared normaliser the step would differ (the test can see it): the same two
    # halves stepped as two plain batches report other losses.
    _, plain, _ = one_step(cfg, model, halves(batch), accum=1)
    mean_plain = sum(m["loss_inst"] for _, m in plain) / 2
    assert abs(mean_plain / full[1]["loss_inst"] - 1) > 1e-2


def test_under_ddp_only_the_last_micro_batch_synchronises_gradients(setup, tmp_path):
    """A real (gloo, one-process) DDP model: its gradient all-reduce runs for the last
    micro-batch only (``no_sync`` on the others), and the step equals the plain one."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    cfg, model, batch = setup
    _, _, want = one_step(cfg, model, halves(batch), accum=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(model))
        reduced = []

        def counting_hook(state, bucket):
            reduced.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)
        train_one_epoch(ddp, build_criterion(cfg.loss), optimizer, None, halves(batch), device="cpu",
                        precision="fp32", grad_clip=0.0, report=lambda m, s: None, log_every=1, grad_accum_steps=2)
        buckets = len(set(reduced))
        assert buckets >= 1 and len(reduced) == buckets  # one backward's worth of all-reduces, not two
        got = {n.removeprefix("module."): p.grad for n, p in ddp.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


def test_steps_count_optimizer_steps_and_a_short_last_group_still_steps(setup):
    cfg, model, batch = setup
    parts = halves(batch)
    step, reports, _ = one_step(cfg, model, parts + parts[:1], accum=2)
    assert step == 2 and [s for s, _ in reports] == [1, 2]


def test_grad_accum_steps_is_validated():
    assert load_config(tiny()).train.grad_accum_steps == 1
    with pytest.raises(ConfigError, match="train.grad_accum_steps must be >= 1"):
        load_config(tiny(), ["train.grad_accum_steps=0"])
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        train_one_epoch(None, None, None, None, [], device="cpu", precision="fp32", grad_clip=0.0,
                        report=print, grad_accum_steps=0)


def test_plan_data_needs_the_batch_to_split_over_workers_and_micro_batches():
    from pipelines.training.job import plan_data

    manifest = {"counts": {"train": {"samples": 40}, "val": {"samples": 9}}}
    cfg = load_config("tiny", ["train.batch_size=8", "train.grad_accum_steps=2"])
    plan = plan_data(cfg, "/d", manifest, num_workers=2)
    assert plan.steps_per_epoch == 5  # optimizer steps: 40 samples / global batch 8
    with pytest.raises(ValueError, match=r"train.batch_size=8 does not split evenly over 1 workers × "
                                         r"train.grad_accum_steps=3 micro-batches"):
        plan_data(load_config(cfg, ["train.grad_accum_steps=3"]), "/d", manifest, num_workers=1)
    assert plan_data(cfg, "/d", manifest, num_workers=4).steps_per_epoch == 5  # micro-batches of 1




@pytest.mark.ray
def test_a_worker_accumulating_2_micro_batches_equals_one_taking_the_whole_batch(prepared_dataset, ray_local,
                                                                                  tmp_path):
    """The worker wiring: micro-batches of batch_size / grad_accum_steps, the same samples per
    optimizer step as without accumulation (``ordered`` data), and the same per-step losses
    (module docstring: deterministic terms, optimizer steps made negligible as in test_multinode)."""
    import json

    from mlflow import MlflowClient

    from pipelines.training.train import train
    from tests.support.worker_hooks import SampleLog, observing

    base = ["data.max_train_samples=16", "data.max_val_samples=4", "data.num_overlays=0", "train.epochs=1",
            "train.batch_size=8", "train.max_steps=2", "train.log_every_steps=1", "train.precision=fp32",
            "loss.mask_weight=0", "loss.num_points=256", "model.backbone.kwargs.drop_path_rate=0.0",
            "train.lr=1.0e-12", "train.min_lr=1.0e-12"]
    common = dict(num_workers=1, cpus_per_worker=0.5, data_order="ordered", storage_path=str(tmp_path / "ray"),
                  experiment="test-accum", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", max_failures=0)
    runs = {}
    for accum in (1, 2):
        cfg = load_config("tiny", base + [f"train.grad_accum_steps={accum}"])
        with observing(SampleLog(tmp_path / str(accum))):
            runs[accum] = train(cfg, str(prepared_dataset), name=f"accum{accum}", **common)

    def steps(accum):
        rows = [json.loads(line) for line in (tmp_path / str(accum) / "rank0.jsonl").read_text().splitlines()]
        return [(r["step"], r["sample_ids"]) for r in rows if "step" in r]

    plain, micro = steps(1), steps(2)
    assert [s for s, _ in plain] == [1, 2] and [s for s, _ in micro] == [1, 1, 2, 2]
    assert all(len(ids) == 4 for _, ids in micro)
    for step, ids in plain:
        assert sorted(i for s, m in micro if s == step for i in m) == sorted(ids)
    client = MlflowClient(tracking_uri=common["tracking_uri"])
    for key in ("loss", "loss_merged", "loss_inst", "loss_nt", "grad_norm"):
        curves = [[m.value for m in sorted(client.get_metric_history(runs[a].mlflow_run_id, key),
                                           key=lambda m: m.step)] for a in (1, 2)]
        assert len(curves[0]) == len(curves[1]) == 2, key
        assert curves[1] == pytest.approx(curves[0], rel=1e-5), key
