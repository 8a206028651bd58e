"""InstAlign model: every Table 3 switch builds, runs and trains every parameter; masks are respected.

Its parts have their own files: ``test_backbone.py``, ``test_pot.py``, ``test_heads.py``, ``test_builders.py``, ...
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest
import torch

from instalign.config import ModelConfig, tiny
from instalign.modeling import InstAlign, InstAlignOutput, build_model, instalign_tiny


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

