"""The plain loops (instalign.engine), the optimiser/schedule (instalign.optim) and tracking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instalign.config import load_config, tiny
from instalign.data.transforms import GRESTransform
from instalign.engine import evaluate, postprocess, resolve_precision, train_one_epoch
from instalign.losses import build_criterion
from instalign.metrics import GRESMetrics
from instalign.modeling.builders import build_model
from instalign.modeling.outputs import BlockPrediction, InstAlignOutput
from instalign.modeling.text_encoder import load_tokenizer
from instalign.optim import build_optimizer, build_scheduler, param_groups
from instalign.tracking import NullTracker, Tracker, finite_metrics
from tests.support.scenes import scene_batch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    cfg = load_config(tiny(), ["loss.nt_pos_weight=1"])  # no prepared split to balance on
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    transform = GRESTransform(image_size=cfg.model.image_size, max_tokens=cfg.model.text_encoder.max_tokens,
                              tokenizer=tokenizer)
    return cfg, transform


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg.model)


def test_train_one_epoch_reduces_loss_and_reports(parts):
    cfg, transform = parts
    model = _model(cfg)
    criterion = build_criterion(cfg.loss)
    batches = [scene_batch(transform, seed) for seed in (1, 2)]
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=cfg.train.weight_decay, backbone_lr_mult=1.0,
                                text_encoder_lr_mult=1.0)
    scheduler = build_scheduler(optimizer, total_steps=24, lr=1e-3, min_lr=1e-4)
    reports = []
    step = train_one_epoch(model, criterion, optimizer, scheduler, batches * 6, device="cpu", precision="fp32",
                           grad_clip=1.0, report=lambda m, s: reports.append((s, m)), log_every=2)
    assert step == 12
    assert [s for s, _ in reports] == [2, 4, 6, 8, 10, 12]
    first, last = reports[0][1], reports[-1][1]
    for key in ("loss", "lr", "samples_per_s", "grad_norm"):
        assert key in first and math.isfinite(first[key]), key
    assert any(k.startswith("loss_") for k in first)  # the named terms of eq. 13
    assert first["samples_per_s"] > 0
    assert last["lr"] < first["lr"] <= 1e-3  # linear decay applied per step
    assert last["loss"] < 0.8 * first["loss"], (first["loss"], last["loss"])
    # A second epoch continues the global step.
    step = train_one_epoch(model, criterion, optimizer, scheduler, batches, device="cpu", precision="fp32",
                           grad_clip=0.0, report=lambda m, s: reports.append((s, m)), step=step, log_every=10)
    assert step == 14 and reports[-1][0] == 14  # partial window flushed at epoch end


def test_grad_norm_is_reported_before_clipping_with_the_clipped_share(parts):
    """``grad_norm`` is the norm the clip saw (not the clipped one); ``grad_clipped`` the share of clipped steps."""
    import copy

    cfg, transform = parts
    model = _model(cfg)
    criterion = build_criterion(cfg.loss)
    batch = scene_batch(transform, 1)
    twin = copy.deepcopy(model)
    torch.manual_seed(123)  # the criterion's point sampling draws random numbers: same draw twice
    criterion(twin(batch.images, batch.input_ids, batch.attention_mask), batch)["loss"].backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters() if p.grad is not None]).item()
    for clip, share in ((1e-6, 1.0), (1e9, 0.0), (0.0, 0.0)):
        m = copy.deepcopy(model)
        optimizer = build_optimizer(m, lr=1e-4, weight_decay=0.0, backbone_lr_mult=1.0, text_encoder_lr_mult=1.0)
        reports = []
        torch.manual_seed(123)
        train_one_epoch(m, criterion, optimizer, None, [batch], device="cpu", precision="fp32", grad_clip=clip,
                        report=lambda metrics, s: reports.append(metrics), log_every=1)
        (metrics,) = reports
        assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-4), clip
        assert metrics["grad_clipped"] == share, clip


def test_max_steps_stops_early(parts):
    cfg, transform = parts
    model = _model(cfg)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)
    seen = []

    def batches():
        for seed in range(10):
            seen.append(seed)
            yield scene_batch(transform, seed)

    reports = []
    step = train_one_epoch(model, build_criterion(cfg.loss), optimizer, None, batches(), device="cpu",
                           precision="fp32", grad_clip=1.0, report=lambda m, s: reports.append(s), step=5,
                           max_steps=7, log_every=10)
    assert step == 7
    assert len(seen) == 3  # two trained, the third seen and refused at the cap
    assert reports == [7]


def _outputs(merged: torch.Tensor, nt: torch.Tensor) -> InstAlignOutput:
    b, h, w = merged.shape
    block = BlockPrediction(mask_logits=torch.zeros(b, 2, h, w), score_logits=torch.zeros(b, 2),
                            phrase_loss=torch.zeros(b, 2), phrase_weights=torch.full((b, 2, 3), 1 / 3))
    return InstAlignOutput(final=block, merged_logits=merged, no_target_logits=nt,
                           text_mask=torch.ones(b, 3, dtype=torch.bool))


def test_postprocess_follows_the_inference_rule():
    torch.manual_seed(0)
    merged = torch.randn(3, 8, 8) * 4
    merged[1] = 5.0  # everything "in" ...
    nt = torch.tensor([-3.0, 3.0, 0.0])  # ... but sample 1 says no target; p̂_nt = 0.5 is not > 0.5
    masks, no_target, prob, nt_prob = postprocess(_outputs(merged, nt), (32, 20))
    assert masks.shape == prob.shape == (3, 32, 20) and masks.dtype == torch.bool
    assert no_target.tolist() == [False, True, False]
    assert torch.allclose(nt_prob, torch.sigmoid(nt))
    assert not masks[1].any() and (prob[1] > 0.5).all()  # emptied by p̂_nt > 0.5, prob kept for display
    expected = F.interpolate(merged[:, None], size=(32, 20), mode="bilinear", align_corners=False)[:, 0].sigmoid()
    assert torch.allclose(prob, expected, atol=1e-6)
    assert torch.equal(masks[0], expected[0] > 0.5) and torch.equal(masks[2], expected[2] > 0.5)
    # An int size means a square; the native size is not resampled.
    masks8, *_ = postprocess(_outputs(merged, nt), 8)
    assert torch.equal(masks8[0], merged[0] > 0)


def test_evaluate_matches_manual_metrics(parts):
    cfg, transform = parts
    model = _model(cfg).train()
    batches = [scene_batch(transform, 3), scene_batch(transform, 4)]
    batches[1].no_target[1] = True  # a no-target sample (GT mask ignored by the metric rules)
    batches[1].instance_masks[1] = batches[1].instance_masks[1][:0]
    batches[1].union_masks[1] = False
    metrics = evaluate(model, batches, device="cpu", precision="fp32")
    assert isinstance(metrics, GRESMetrics)
    assert model.training  # the caller's mode is restored
    manual = GRESMetrics()
    model.eval()
    with torch.no_grad():
        for b in batches:
            masks, nt, _, _ = postprocess(model(b.images, b.input_ids, b.attention_mask), b.images.shape[-1])
            manual.update(masks, nt, b.union_masks, b.no_target, [len(m) for m in b.instance_masks])
    got, want = metrics.compute(), manual.compute()
    assert got["single.samples"] + got["multi.samples"] + got["no_target.samples"] == 4  # every sample in a slice
    assert got.keys() == want.keys()
    for k in want:
        assert (math.isnan(got[k]) and math.isnan(want[k])) or got[k] == pytest.approx(want[k]), k


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # explicit: honoured (CPU autocast)
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_bf16_step_on_cpu_gives_fp32_losses(parts):
    cfg, transform = parts
    model = _model(cfg)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, backbone_lr_mult=1.0, text_encoder_lr_mult=1.0)
    reports = []
    train_one_epoch(model, build_criterion(cfg.loss), optimizer, None, [scene_batch(transform, 5)], device="cpu",
                    precision="bf16", grad_clip=1.0, report=lambda m, s: reports.append(m), log_every=1)
    assert math.isfinite(reports[0]["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the weights


def test_param_groups_split_encoders_and_decay(parts):
    cfg, _ = parts
    model = _model(cfg)
    groups = param_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.2)
    by_name = {g["name"]: g for g in groups}
    assert {"backbone", "backbone_no_decay", "text_encoder", "text_encoder_no_decay", "decoder",
            "decoder_no_decay"} == set(by_name)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    assert by_name["backbone"]["lr"] == pytest.approx(1e-5) and by_name["text_encoder"]["lr"] == pytest.approx(2e-5)
    assert by_name["decoder"]["lr"] == pytest.approx(1e-4)
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith("no_decay"))
    assert all(g["weight_decay"] == 0.05 for n, g in by_name.items() if not n.endswith("no_decay"))
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    backbone = {id(p) for p in model.backbone.parameters()}
    for pid, name in names.items():
        if pid in backbone:
            assert group_of[pid].startswith("backbone"), name
        if name.endswith(".bias") or ".norm" in name or "LayerNorm" in name:
            assert group_of[pid].endswith("no_decay"), name
    # The text projection to C is new: full rate, not the encoder's multiplier.
    projections = [n for n in names.values() if "text_encoder" in n and ".proj." in n]
    assert projections and all(group_of[pid].startswith("decoder") for pid, n in names.items() if n in projections)
    # Learned queries (embeddings) are not decayed.
    embeds = [pid for pid, n in names.items() if "query" in n and "embed" in n or "query_feat" in n]
    assert embeds and all(group_of[pid].endswith("no_decay") for pid in embeds)


def test_tracking_protocol_and_report_adapter():
    class Recorder:
        def __init__(self):
            self.rows = []

        def log_params(self, params): ...
        def log_metrics(self, metrics, step): self.rows.append((step, dict(metrics)))
        def log_artifact(self, path, artifact_path=None): ...
        def log_image(self, image, name): ...
        def close(self): ...

    rec = Recorder()
    assert isinstance(rec, Tracker) and isinstance(NullTracker(), Tracker)
    rec.log_metrics(finite_metrics({"loss": torch.tensor(0.5), "N_acc": float("nan"), "lr": 1e-4, "tag": "x"}), 3)
    assert rec.rows == [(3, {"loss": 0.5, "lr": 1e-4})]
    assert finite_metrics({"a": 1, "b": True, "c": float("inf")}) == {"a": 1.0}
    with NullTracker() as t:
        t.log_metrics({"x": 1.0}, 0)


def test_bf16_forward_keeps_the_blocks_mask_logits_in_bf16(parts):
    """The K blocks' (B, N, H, W) mask logits are not copied to fp32 (~1.6 GiB at the paper
    preset): the losses read them at points; every other output is fp32 for the losses."""
    from instalign.engine import forward_batch

    cfg, transform = parts
    out = forward_batch(_model(cfg), scene_batch(transform, 6), device="cpu", precision="bf16")
    assert all(b.mask_logits.dtype == torch.bfloat16 for b in [out.final, *out.aux])
    assert out.final.score_logits.dtype == out.merged_logits.dtype == out.no_target_logits.dtype == torch.float32
    assert out.final.phrase_loss.dtype == torch.float32
