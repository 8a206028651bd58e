"""InstAlign model: every Table 3 switch builds, runs and trains every parameter; masks are respected."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F

from instalign.config import BackboneConfig, ModelConfig, tiny
from instalign.modeling import BackboneLoadError, InstAlign, InstAlignOutput, build_model, instalign_tiny
from instalign.modeling.backbone import create_backbone
from instalign.modeling.heads import EMPTY_LOGIT, InstanceAggregation, NoTargetHead, sentence_feature
from instalign.modeling.pot import Attention, PhraseObjectBlock, PhraseObjectDecoder, fallback_unmask, \
    phrase_object_alignment


def small_cfg(**overrides) -> ModelConfig:
    """The tiny preset at 64×64 (the same code paths, a quarter of the pixels)."""
    cfg = tiny().model
    cfg.image_size = 64
    cfg.backbone.kwargs = dict(cfg.backbone.kwargs, img_size=64)
    return dataclasses.replace(cfg, **overrides)


def inputs(cfg: ModelConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, length = cfg.image_size, cfg.text_encoder.max_tokens
    images = torch.randn(b, 3, s, s, generator=g)
    input_ids = torch.randint(5, 500, (b, length), generator=g)
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[0, 7:] = 0  # sample 0 is shorter: right padding as the tokenizer does
    input_ids[0, 7:] = 1  # RoBERTa's <pad>
    return images, input_ids, attention_mask


def training_loss(out: InstAlignOutput) -> torch.Tensor:
    """Every term the criterion reads: merged, no-target, and per block masks, scores, phrase loss."""
    total = out.merged_logits.sigmoid().mean() + out.no_target_logits.sigmoid().mean()
    for pred in [out.final, *out.aux]:
        total = total + pred.mask_logits.sigmoid().mean() + pred.score_logits.sigmoid().mean() + pred.phrase_loss.mean()
    return total


def check_output(out: InstAlignOutput, *, b: int, n: int, k: int, length: int, side: int) -> None:
    h = side // 4
    assert isinstance(out, InstAlignOutput)
    assert len(out.aux) == k - 1
    for pred in [out.final, *out.aux]:
        assert pred.mask_logits.shape == (b, n, h, h) and pred.mask_logits.dtype == torch.float32
        assert pred.score_logits.shape == (b, n) and pred.score_logits.dtype == torch.float32
        assert pred.phrase_loss.shape == (b, n) and pred.phrase_loss.dtype == torch.float32
        assert pred.phrase_weights.shape == (b, n, length) and pred.phrase_weights.dtype == torch.float32
        for t in (pred.mask_logits, pred.score_logits, pred.phrase_loss, pred.phrase_weights):
            assert torch.isfinite(t).all()
        assert (pred.phrase_loss >= -1e-5).all() and (pred.phrase_loss <= 2 + 1e-5).all()  # 1 - cos
        torch.testing.assert_close(pred.phrase_weights.sum(-1), torch.ones(b, n))
        assert (pred.phrase_weights[~out.text_mask[:, None, :].expand(b, n, length)] == 0).all()
    assert out.merged_logits.shape == (b, h, h) and out.merged_logits.dtype == torch.float32
    assert out.no_target_logits.shape == (b,) and out.no_target_logits.dtype == torch.float32
    assert torch.isfinite(out.merged_logits).all() and torch.isfinite(out.no_target_logits).all()
    assert out.text_mask.dtype == torch.bool and out.text_mask.shape == (b, length)


SWITCHES = list(itertools.product(("aia", "aia_no_prelu", "fixed_threshold"),
                                  ("concat", "q_global", "t_sen", "mean_queries"),
                                  ("pot", "mask2former", "rela")))


@pytest.mark.parametrize("aggregation,no_target_input,decoder", SWITCHES)
def test_every_switch_shapes_and_gradients(aggregation, no_target_input, decoder):
    torch.manual_seed(0)
    cfg = small_cfg(aggregation=aggregation, no_target_input=no_target_input, decoder=decoder)
    model = build_model(cfg)
    assert model.decoder.heads.text_score == (decoder == "mask2former")  # text-free decoder: scores read T_sen
    assert all((blk.object_text is not None) == (decoder == "pot") for blk in model.decoder.blocks)
    assert all((blk.region_language is not None) == (decoder == "rela") for blk in model.decoder.blocks)
    assert (model.aggregator.prelu is not None) == (aggregation == "aia")
    images, ids, mask = inputs(cfg)
    out = model(images, ids, mask)
    check_output(out, b=2, n=cfg.num_queries, k=cfg.num_blocks, length=cfg.text_encoder.max_tokens,
                 side=cfg.image_size)
    training_loss(out).backward()
    # DDP refuses parameters without gradient: every one must take part, with finite values
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("num_queries,num_blocks", [(1, 1), (5, 4)])
def test_queries_and_blocks(num_queries, num_blocks):
    torch.manual_seed(0)
    cfg = small_cfg(num_queries=num_queries, num_blocks=num_blocks, pre_norm=num_blocks == 4)
    model = build_model(cfg)
    assert model.num_queries == num_queries and model.num_blocks == num_blocks
    images, ids, mask = inputs(cfg)
    out = model(images, ids, mask)
    check_output(out, b=2, n=num_queries, k=num_blocks, length=cfg.text_encoder.max_tokens, side=cfg.image_size)
    training_loss(out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("decoder", ["pot", "mask2former", "rela"])
def test_padding_tokens_do_not_change_outputs(decoder):
    torch.manual_seed(0)
    cfg = small_cfg(decoder=decoder)
    model = build_model(cfg).eval()
    images, ids, mask = inputs(cfg)
    changed = ids.clone()
    changed[0, 7:] = torch.arange(100, 100 + changed.shape[1] - 7)  # garbage beyond the mask
    with torch.no_grad():
        a, b = model(images, ids, mask), model(images, changed, mask)
    for x, y in [(a.merged_logits, b.merged_logits), (a.no_target_logits, b.no_target_logits),
                 (a.final.mask_logits, b.final.mask_logits), (a.final.score_logits, b.final.score_logits),
                 (a.final.phrase_loss, b.final.phrase_loss), (a.final.phrase_weights, b.final.phrase_weights)]:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # ... while a real token does change them (the test can fail)
    changed[0, 2] = ids[0, 2] + 1
    with torch.no_grad():
        c = model(images, changed, mask)
    assert not torch.allclose(a.final.score_logits[0], c.final.score_logits[0])


def test_masked_attention_and_fully_masked_row_fallback():
    allowed = torch.tensor([[True, False, False], [False, False, False]])
    assert fallback_unmask(allowed).tolist() == [[True, False, False], [True, True, True]]
    # the attention mask from a prediction: σ ≥ 0.5 kept; a query predicting nothing attends everywhere
    logits = torch.full((1, 2, 8, 8), -5.0)
    logits[0, 0, :4, :4] = 5.0  # query 0: top-left quarter
    m = PhraseObjectDecoder.attention_mask(logits, (4, 4))
    assert m.shape == (1, 1, 2, 16)
    assert m[0, 0, 0].view(4, 4)[:2, :2].all() and m[0, 0, 0].sum() == 4
    assert m[0, 0, 1].all()
    # a query allowed one pixel reads exactly that pixel's value
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    q, mem = torch.randn(1, 2, 8), torch.randn(1, 5, 8)
    only = torch.zeros(1, 1, 2, 5, dtype=torch.bool)
    only[..., 0, 3] = True
    out = attn(q, mem, mem, fallback_unmask(only))
    torch.testing.assert_close(out[0, 0], attn.out_proj(attn.v_proj(mem[0, 3])))
    unmasked = attn(q, mem, mem, None)
    torch.testing.assert_close(out[0, 1], unmasked[0, 1])  # the fully masked row attends everywhere
    # a block with every pixel masked for every query stays finite
    none = fallback_unmask(torch.zeros(1, 1, 2, 5, dtype=torch.bool))
    for text_attention in ("object_text", "region_language", "none"):
        block = PhraseObjectBlock(dim=8, num_heads=2, ffn_dim=16, dropout=0.0, pre_norm=False,
                                  text_attention=text_attention)
        qq, tt = block(q, torch.zeros_like(q), mem, torch.zeros_like(mem), none, torch.randn(1, 3, 8),
                       torch.tensor([[True, True, False]]))
        assert torch.isfinite(qq).all() and torch.isfinite(tt).all()
    with pytest.raises(ValueError, match="text_attention"):
        PhraseObjectBlock(dim=8, num_heads=2, ffn_dim=16, dropout=0.0, pre_norm=False, text_attention=True)


def _decoder_trace(model: InstAlign, images, ids, mask) -> tuple[InstAlignOutput, list[torch.Tensor], torch.Tensor]:
    """The model's output, every block's output queries (what the next block's queries see), and T_K."""
    seen: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: seen.append(out[0].detach().clone()))
             for blk in model.decoder.blocks]
    try:
        with torch.no_grad():
            out = model(images, ids, mask)
            mask_features, multi_scale = model.pixel_decoder(model.backbone(images))
            _, _, t_last = model.decoder(multi_scale, mask_features, model.text_encoder(ids, mask), mask.bool())
    finally:
        for h in hooks:
            h.remove()
    return out, seen[:len(model.decoder.blocks)], t_last


@pytest.mark.parametrize("decoder", ["pot", "mask2former", "rela"])
def test_where_the_text_enters_the_decoder(decoder):
    """Table 3 (e): the Mask2Former row's decoder sees no text; POT and ReLA's queries read it.

    Two different expressions for the same images: with ``mask2former`` every block's queries
    and every instance mask are identical (only the relevance scores, computed after the
    decoder against the sentence, differ); with ``pot``/``rela`` the queries differ. Words are
    updated by the queries only in POT (bidirectional); ReLA's and Mask2Former's T_K is T0.
    """
    torch.manual_seed(0)
    cfg = small_cfg(decoder=decoder)
    model = build_model(cfg).eval()
    images, ids, mask = inputs(cfg)
    other = ids.clone()
    other[:, 1:5] = (ids[:, 1:5] + 7) % 500 + 5  # other real words, same length
    a, qa, ta = _decoder_trace(model, images, ids, mask)
    b, qb, _ = _decoder_trace(model, images, other, mask)
    assert len(qa) == cfg.num_blocks
    same_queries = all(torch.equal(x, y) for x, y in zip(qa, qb))
    same_masks = all(torch.equal(x.mask_logits, y.mask_logits) for x, y in zip([a.final, *a.aux], [b.final, *b.aux]))
    assert same_queries == same_masks == (decoder == "mask2former")
    assert not torch.allclose(a.final.score_logits, b.final.score_logits)  # every row is language-aware
    with torch.no_grad():
        t0 = model.text_encoder(ids, mask)
    assert torch.equal(ta, t0) == (decoder != "pot")


def test_phrase_object_alignment_matches_equations():
    torch.manual_seed(0)
    q, t = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss, weights = phrase_object_alignment(q, t, mask)
    for b in range(2):
        real = t[b, mask[b]]
        r = torch.softmax(q[b] @ real.T / math.sqrt(8), dim=-1)  # eq. 1
        p = r @ real  # eq. 2
        torch.testing.assert_close(weights[b][:, mask[b]], r)
        torch.testing.assert_close(loss[b], 1 - F.cosine_similarity(p, q[b], dim=-1))  # eq. 3
        assert (weights[b][:, ~mask[b]] == 0).all()


def test_aggregation_variants():
    torch.manual_seed(0)
    s, scores = torch.randn(2, 3, 4, 4), torch.tensor([[2.0, -2.0, 0.5], [-3.0, -1.0, -2.0]])
    aia = InstanceAggregation(mode="aia")
    with torch.no_grad():
        aia.prelu.weight.fill_(0.3)
    p = scores.sigmoid()[:, :, None, None]
    torch.testing.assert_close(aia(s, scores), (p * torch.where(s > 0, s, 0.3 * s)).sum(1))  # eq. 8
    torch.testing.assert_close(InstanceAggregation(mode="aia_no_prelu")(s, scores), (p * s).sum(1))
    fixed = InstanceAggregation(mode="fixed_threshold", score_threshold=0.55)(s, scores)
    torch.testing.assert_close(fixed[0], s[0, [0, 2]].amax(0))  # σ(2)=.88, σ(.5)=.62 kept; σ(-2) dropped
    assert (fixed[1] == EMPTY_LOGIT).all()  # nothing kept: "no pixel" everywhere
    with pytest.raises(ValueError):
        InstanceAggregation(mode="mean")


def test_no_target_inputs():
    torch.manual_seed(0)
    q, scores, t = torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    sen = sentence_feature(t, mask)
    torch.testing.assert_close(sen[1], t[1, 0])
    head = NoTargetHead(dim=8, mode="concat")
    q_global = (scores.sigmoid()[..., None] * q).sum(1)  # eq. 10
    torch.testing.assert_close(head(q, scores, t, mask), head.mlp(torch.cat([q_global, sen], -1)).squeeze(-1))
    head = NoTargetHead(dim=8, mode="mean_queries")  # Table 3 (c): the queries' mean alone
    torch.testing.assert_close(head(q, scores, t, mask), head.mlp(q.mean(1)).squeeze(-1))
    torch.testing.assert_close(head(q, scores, torch.randn(2, 4, 8), mask), head(q, scores, t, mask))
    assert NoTargetHead(dim=8, mode="mean_queries").mlp.layers[0].in_features == 8
    assert NoTargetHead(dim=8, mode="q_global").mlp.layers[0].in_features == 8
    assert NoTargetHead(dim=8, mode="t_sen").mlp.layers[0].in_features == 8


def test_paper_backbone_is_the_imagenet22k_swin_b(monkeypatch):
    """The paper (like Mask2Former and ReLA) starts from Swin-B's ImageNet-22k weights.

    Resolved without downloading: timm's pretrained config for the preset's name, and the
    name ``create_backbone`` hands to ``timm.create_model`` unchanged.
    """
    import timm
    from timm.models import get_pretrained_cfg

    from instalign.config import paper

    name = paper().model.backbone.name
    assert name == "swin_base_patch4_window12_384.ms_in22k"
    cfg = get_pretrained_cfg(name)
    assert cfg.tag == "ms_in22k" and cfg.hf_hub_id == "timm/swin_base_patch4_window12_384.ms_in22k"
    assert cfg.num_classes == 21841  # the 22k head, not the ImageNet-1k fine-tune
    assert get_pretrained_cfg("swin_base_patch4_window12_384").tag == "ms_in22k_ft_in1k"  # what no tag gives

    calls = []

    def fake_create_model(model_name, **kwargs):
        calls.append((model_name, kwargs))
        raise RuntimeError("stop here: nothing is downloaded")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    with pytest.raises(BackboneLoadError):
        create_backbone(name=name, pretrained=True, out_indices=(0, 1, 2, 3), image_size=480)
    assert calls[0][0] == name and calls[0][1]["pretrained"] is True


def test_backbone_formats_local_weights_and_errors(tmp_path):
    from safetensors.torch import save_file

    swin = create_backbone(name="swin_tiny_patch4_window7_224", pretrained=False, out_indices=(0, 1, 2, 3),
                           image_size=64, kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                                      window_size=4))
    cnn = create_backbone(name="resnet18", pretrained=False, out_indices=(1, 2, 3, 4), image_size=64)
    assert swin.channels_last and not cnn.channels_last
    x = torch.randn(1, 3, 64, 64)
    for bb in (swin, cnn):
        assert bb.strides == [4, 8, 16, 32]
        for f, c, s in zip(bb(x), bb.channels, bb.strides):
            assert f.shape == (1, c, 64 // s, 64 // s)  # NCHW whatever timm returned
    # a local weights file (timm's pretrained_cfg_overlay) is loaded for real
    import timm

    ref = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(ref.state_dict(), str(path))
    loaded = create_backbone(name="resnet18", pretrained=str(path), out_indices=(1, 2, 3, 4), image_size=64)
    torch.testing.assert_close(loaded.body.conv1.weight, ref.conv1.weight)
    with pytest.raises(BackboneLoadError, match="no such weights file"):
        create_backbone(name="resnet18", pretrained=str(tmp_path / "missing.pth"), out_indices=(1, 2, 3, 4),
                        image_size=64)
    with pytest.raises(BackboneLoadError, match="model.backbone.pretrained"):  # HF_HUB_OFFLINE=1 (conftest)
        create_backbone(name="resnet18", pretrained=True, out_indices=(1, 2, 3, 4), image_size=64)
    with pytest.raises(BackboneLoadError, match="not a timm model"):
        create_backbone(name="no_such_net", pretrained=False, out_indices=(0, 1, 2, 3), image_size=64)
    with pytest.raises(ValueError, match="strides"):
        build_model(small_cfg(backbone=BackboneConfig(name="resnet18", pretrained=False, out_indices=(0, 1, 2, 3))))


def test_tiny_forward_backward_on_cpu_at_128(record_property):
    """The tiny preset at 128×128, batch 2, fp32 and bf16 autocast; the time is measured, not asserted."""
    torch.manual_seed(0)
    model = instalign_tiny()
    assert isinstance(model, InstAlign) and model.image_size == 128
    cfg = tiny().model
    images, ids, mask = inputs(cfg)
    training_loss(model(images, ids, mask)).backward()  # warm-up
    model.zero_grad()
    start = time.perf_counter()
    out = model(images, ids, mask)
    training_loss(out).backward()
    seconds = time.perf_counter() - start
    record_property("tiny_fwd_bwd_seconds_b2_128px", round(seconds, 3))
    print(f"\ntiny preset forward+backward, batch 2 at 128x128 on CPU: {seconds:.3f} s")
    check_output(out, b=2, n=cfg.num_queries, k=cfg.num_blocks, length=cfg.text_encoder.max_tokens, side=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images, ids, mask)
    assert torch.isfinite(low.merged_logits).all() and torch.isfinite(low.no_target_logits).all()
    assert low.final.phrase_weights.dtype == torch.float32 and low.merged_logits.dtype == torch.float32


@pytest.mark.slow
def test_paper_backbone_runs_at_480():
    """Swin-B (random init) at the paper's 480×480 — ~15 s on 2 CPU cores, so marked slow."""
    bb = create_backbone(name="swin_base_patch4_window12_384", pretrained=False, out_indices=(0, 1, 2, 3),
                         image_size=480)
    assert bb.channels == [128, 256, 512, 1024] and bb.strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 480, 480))
    assert [tuple(f.shape[-2:]) for f in feats] == [(120, 120), (60, 60), (30, 30), (15, 15)]

