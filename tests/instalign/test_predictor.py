"""The predictor: inputs of every kind, original-size outputs, batching, explanations, errors."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from instalign.checkpoint import save_checkpoint
from instalign.config import load_config, tiny
from instalign.data.transforms import GRESTransform
from instalign.engine import masks_at_sizes, size_chunks
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer
from instalign.predictor import Prediction, Predictor, _token_words, load_image
from tests.support.host_sync_counter import HostSyncCounter


pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 61, 97  # odd and non-square: the model sees 128×128


def _picture(seed: int, h: int = H, w: int = W) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((h, w, 3), 100, np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        pixels[y:y + rng.integers(8, 30), x:x + rng.integers(8, 30)] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def _set_bias(linear: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        linear.bias.fill_(value)


def _last_linear(module: torch.nn.Module) -> torch.nn.Linear:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _set_bias(_last_linear(model.no_target_head), -6.0)  # "there is a target" for every input
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    return cfg, model, tokenizer, Predictor(model, cfg, tokenizer, "cpu", mask_prob=True)


def _same(a: Prediction, b: Prediction, atol: float = 0.0) -> None:
    assert a.no_target == b.no_target
    assert a.no_target_prob == pytest.approx(b.no_target_prob, abs=max(atol, 1e-12))
    assert np.allclose(a.mask_prob, b.mask_prob, atol=atol, rtol=0)
    decided = np.abs(a.mask_prob - 0.5) > max(atol, 1e-7) * 10  # away from the threshold
    assert np.array_equal(a.mask[decided], b.mask[decided])
    assert [i.index for i in a.instances] == [i.index for i in b.instances]
    assert [w for w, _ in a.instances[0].words] == [w for w, _ in b.instances[0].words] if a.instances else True


def test_outputs_are_at_the_original_size(setup):
    *_, predictor = setup
    pred = predictor.predict(_picture(0), "the red square on the left")
    assert pred.mask.shape == (H, W) and pred.mask.dtype == bool
    assert pred.mask_prob.shape == (H, W) and pred.mask_prob.dtype == np.float32
    assert 0.0 <= pred.no_target_prob <= 1.0 and pred.no_target is False
    assert np.array_equal(pred.mask, pred.mask_prob > 0.5)
    for inst in pred.instances:
        assert inst.mask.shape == (H, W) and inst.mask.dtype == bool
    assert pred.words == ["the", "red", "square", "on", "the", "left"]


def test_every_image_input_kind_gives_the_same_answer(setup, tmp_path):
    *_, predictor = setup
    picture = _picture(1)
    path = tmp_path / "scene.png"
    picture.save(path)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    expression = "two blue circles"
    reference = predictor.predict(picture, expression)
    for image in (str(path), path, np.asarray(picture), np.asarray(picture).astype(np.float32) / 255.0,
                  buf.getvalue(), bytearray(buf.getvalue()), picture.convert("RGBA")):
        _same(predictor.predict(image, expression), reference, atol=1e-6)


def test_predict_batch_equals_per_item_predict(setup):
    *_, predictor = setup
    images = [_picture(2), _picture(3, 40, 33), _picture(4, 128, 128)]
    expressions = ["the green box", "all red squares on the top", "the big ball"]
    batched = predictor.predict_batch(images, expressions, batch_size=2)
    assert len(batched) == 3
    for image, expression, got in zip(images, expressions, batched):
        single = predictor.predict(image, expression)
        assert got.mask.shape == single.mask.shape == (image.height, image.width)
        _same(got, single, atol=1e-4)  # batch-size-dependent GEMM blocking: ~1e-6 noise, no leakage


def test_instances_are_those_the_aggregation_keeps(setup):
    cfg, model, tokenizer, predictor = setup
    image, expression = _picture(5), "the red square and the blue circle"
    pred = predictor.predict(image, expression)
    # Recompute p̂ with a direct forward through the same transform.
    x = predictor.transform.image(image)[None]
    ids, attn = predictor.transform.tokenize([expression])
    with torch.no_grad():
        scores = model(x, ids, attn).final.score_logits.sigmoid()[0]
    assert sorted(i.index for i in pred.instances) == (scores > 0.5).nonzero().flatten().tolist()
    assert [i.score for i in pred.instances] == sorted((i.score for i in pred.instances), reverse=True)
    for inst in pred.instances:
        assert inst.score == pytest.approx(float(scores[inst.index]), abs=1e-6)


def test_instance_words_come_from_the_expression(setup):
    cfg, model, tokenizer, _ = setup
    _set_bias(model.decoder.heads.score, 4.0)  # keep every query
    try:
        predictor = Predictor(model, cfg, tokenizer, "cpu", top_words=3)
        expression = "the zebrafishes, left of the red ring"
        pred = predictor.predict(_picture(6), expression)
    finally:
        _set_bias(model.decoder.heads.score, 0.0)
    assert len(pred.instances) == cfg.model.num_queries
    words = re.findall(r"\w+|[^\w\s]", expression)
    assert pred.words == words  # sub-words merged back ("zebrafishes" is several BPE tokens)
    for inst in pred.instances:
        assert len(inst.words) == 3
        assert all(w in words for w, _ in inst.words)
        weights = [wt for _, wt in inst.words]
        assert weights == sorted(weights, reverse=True) and all(0.0 <= wt <= 1.0 for wt in weights)
        assert sum(weights) <= 1.0 + 1e-5  # shares of one softmax row (eq. 1)


def test_word_mapping_without_a_fast_tokenizer(setup):
    _, _, tokenizer, _ = setup
    text = "the zebrafishes left"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 5  # the rare word is split into sub-words

    class Slow:  # the slow-tokenizer path: no offsets, only tokens
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    fast_map, fast_words = _token_words(tokenizer, text, ids)
    slow_map, slow_words = _token_words(Slow(), text, ids)
    assert fast_words == slow_words == ["the", "zebrafishes", "left"]
    assert fast_map == slow_map and fast_map[0] is None and fast_map[-1] is None


def test_fixed_threshold_uses_tau():
    cfg = load_config("tiny", ["model.aggregation=fixed_threshold", "model.score_threshold=0.2"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _set_bias(_last_linear(model.no_target_head), -6.0)
    predictor = Predictor(model, cfg, load_tokenizer(cfg.model.text_encoder), "cpu")
    assert predictor.instance_threshold == 0.2
    image, expression = _picture(7), "the red square"
    pred = predictor.predict(image, expression)
    x = predictor.transform.image(image)[None]
    ids, attn = predictor.transform.tokenize([expression])
    with torch.no_grad():
        scores = model(x, ids, attn).final.score_logits.sigmoid()[0]
    assert sorted(i.index for i in pred.instances) == (scores > 0.2).nonzero().flatten().tolist()


def test_no_target_empties_mask_and_instances(setup):
    cfg, model, tokenizer, _ = setup
    head = _last_linear(model.no_target_head)
    _set_bias(head, 6.0)
    try:
        pred = Predictor(model, cfg, tokenizer, "cpu").predict(_picture(8), "the purple star")
    finally:
        _set_bias(head, -6.0)
    assert pred.no_target and pred.no_target_prob > 0.5
    assert not pred.mask.any() and pred.instances == []
    assert pred.mask.shape == (H, W)


def test_from_checkpoint_matches_the_live_model(setup, tmp_path):
    cfg, model, tokenizer, predictor = setup
    directory = save_checkpoint(tmp_path / "ckpt", model, cfg, tokenizer=tokenizer)
    loaded = Predictor.from_checkpoint(directory, device="cpu", mask_prob=True)
    image, expression = _picture(9), "the left ring"
    a, b = predictor.predict(image, expression), loaded.predict(image, expression)
    assert np.array_equal(a.mask_prob, b.mask_prob) and np.array_equal(a.mask, b.mask)
    assert a.no_target_prob == b.no_target_prob


@pytest.mark.parametrize("image, expression, message", [
    ("GOOD", "", "expression is empty"),
    ("GOOD", "   ", "expression is empty"),
    ("GOOD", None, "expected a string"),
    (b"definitely not an image", "the dog", r"image bytes \(23 bytes\)"),
    (b"", "the dog", "image bytes are empty"),
    ("/no/such/file.jpg", "the dog", "no such file"),
    (np.zeros((4, 4, 2), np.uint8), "the dog", r"shape \(4, 4, 2\)"),
    (np.zeros((4, 4, 3), np.int32), "the dog", "int32"),
    (np.full((4, 4, 3), 2.0), "the dog", r"\[0, 1\]"),
])
def test_bad_input_is_a_clear_value_error(setup, image, expression, message):
    *_, predictor = setup
    if isinstance(image, str) and image == "GOOD":
        image = _picture(0)
    with pytest.raises(ValueError, match=message):
        predictor.predict(image, expression)


def test_bad_batch_arguments(setup, tmp_path):
    *_, predictor = setup
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        predictor.predict_batch([_picture(0), _picture(1)], ["the dog"])
    with pytest.raises(ValueError, match="one string"):
        predictor.predict_batch([_picture(0)], "the dog")
    with pytest.raises(TypeError, match="int"):
        load_image(3)
    truncated = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    _picture(0).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="cut.jpg"):
        predictor.predict(truncated, "the dog")


# ------------------------------------------------------------- the batched device path
def _per_sample_reference(predictor: Predictor, pictures, texts) -> list[Prediction]:
    """The predictor as it was before the batched device path (``_run`` at commit 38621e0): fp32
    normalisation on the host per image, ``postprocess`` per sample, one instance map at a time.
    The oracle the new path must reproduce."""
    from instalign.engine import postprocess
    from instalign.predictor import InstancePrediction, _top_words

    images = torch.stack([predictor.transform.image(p) for p in pictures])
    input_ids, attention_mask = predictor.transform.tokenize(texts)
    with torch.inference_mode():
        outputs = predictor.model(images, input_ids, attention_mask)
    scores = outputs.final.score_logits.float().sigmoid()
    results = []
    for b, (picture, text) in enumerate(zip(pictures, texts)):
        w, h = picture.size
        one = dataclasses.replace(outputs, merged_logits=outputs.merged_logits[b:b + 1],
                                  no_target_logits=outputs.no_target_logits[b:b + 1])
        mask, no_target, merged_prob, nt_prob = postprocess(one, (h, w))
        real = attention_mask[b].bool()
        word_of, words = _token_words(predictor.tokenizer, text, input_ids[b][real].tolist())
        instances = []
        if not bool(no_target[0]):
            keep = (scores[b] > predictor.instance_threshold).nonzero().flatten().tolist()
            weights = outputs.final.phrase_weights[b, keep].float()[:, real]
            for j, i in enumerate(keep):
                logits = outputs.final.mask_logits[b, i:i + 1].float()
                instances.append(InstancePrediction(
                    index=i, score=float(scores[b, i]),
                    mask=(predictor.transform.resize_mask_to(logits, (h, w))[0] > 0).numpy(),
                    words=_top_words(weights[j], word_of, words, predictor.top_words)))
            instances.sort(key=lambda inst: -inst.score)
        results.append(Prediction(mask=mask[0].numpy(), no_target=bool(no_target[0]),
                                  no_target_prob=float(nt_prob[0]), instances=instances,
                                  mask_prob=merged_prob[0].numpy(), words=words))
    return results


def _identical(new: Prediction, old: Prediction) -> None:
    """Masks equal, probabilities within 1e-6, the same instances, words and weights."""
    assert new.mask.shape == old.mask.shape and new.mask.dtype == bool
    assert np.array_equal(new.mask, old.mask)
    assert new.no_target == old.no_target
    assert abs(new.no_target_prob - old.no_target_prob) <= 1e-6
    assert new.mask_prob.dtype == np.float32 and np.abs(new.mask_prob - old.mask_prob).max() <= 1e-6
    assert new.words == old.words
    assert [i.index for i in new.instances] == [i.index for i in old.instances]
    for a, b in zip(new.instances, old.instances):
        assert abs(a.score - b.score) <= 1e-6 and np.array_equal(a.mask, b.mask)
        assert [w for w, _ in a.words] == [w for w, _ in b.words]
        assert np.allclose([x for _, x in a.words], [x for _, x in b.words], atol=1e-6, rtol=0)


#: Mixed original sizes, two of them twice (one upsampling group each), one already at S×S.
MIXED = [(_picture(10), "the red square on the left"), (_picture(11, 40, 33), "all blue boxes"),
         (_picture(12), "the green ball"), (_picture(13, 128, 128), "the box under the ring"),
         (_picture(14, 40, 33), "two squares")]


@pytest.fixture
def some_kept(setup):
    """The score head's bias set so that about half the queries are kept (random init keeps none)."""
    cfg, model, tokenizer, predictor = setup
    x = torch.stack([predictor.transform.image(p) for p, _ in MIXED])
    ids, attn = predictor.transform.tokenize([t for _, t in MIXED])
    with torch.no_grad():
        logits = model(x, ids, attn).final.score_logits
    _set_bias(model.decoder.heads.score, -float(logits.median()))
    yield predictor
    _set_bias(model.decoder.heads.score, 0.0)


def test_batched_device_path_equals_the_per_sample_one(some_kept):
    predictor = some_kept
    pictures, texts = [p for p, _ in MIXED], [t for _, t in MIXED]
    batched = predictor.predict_batch(pictures, texts, batch_size=len(MIXED))
    kept = [len(p.instances) for p in batched]
    assert sum(kept) > 0 and len(set(kept)) > 1  # instances exercised, in different numbers per pair
    for got, want in zip(batched, _per_sample_reference(predictor, pictures, texts)):
        _identical(got, want)
    for picture, text in MIXED[:2]:  # a single request: a batch of one
        _identical(predictor.predict(picture, text), _per_sample_reference(predictor, [picture], [text])[0])


def test_batched_path_with_no_target_and_every_query_kept(setup):
    cfg, model, tokenizer, _ = setup
    predictor = Predictor(model, cfg, tokenizer, "cpu", mask_prob=True)
    pictures, texts = [p for p, _ in MIXED], [t for _, t in MIXED]
    for head, bias in ((model.decoder.heads.score, 4.0), (_last_linear(model.no_target_head), 6.0)):
        _set_bias(head, bias)
        try:
            batched = predictor.predict_batch(pictures, texts, batch_size=len(MIXED))
            reference = _per_sample_reference(predictor, pictures, texts)
        finally:
            _set_bias(head, 0.0 if head is model.decoder.heads.score else -6.0)
        for got, want in zip(batched, reference):
            _identical(got, want)


def test_mask_prob_is_copied_back_only_when_asked_for(setup):
    cfg, model, tokenizer, with_prob = setup
    plain = Predictor(model, cfg, tokenizer, "cpu")
    a, b = plain.predict(_picture(15), "the red square"), with_prob.predict(_picture(15), "the red square")
    assert a.mask_prob is None and b.mask_prob.shape == (H, W)
    assert np.array_equal(a.mask, b.mask)


def test_large_images_are_upsampled_in_chunks_with_the_same_answer():
    """The upsampling budget cuts a group into steps; the answer does not depend on it."""
    torch.manual_seed(0)
    logits = [torch.randn(32, 32) for _ in range(5)]
    sizes = [(61, 97), (40, 33), (61, 97), (61, 97), (128, 128)]
    assert size_chunks(sizes, budget=2 * 61 * 97) == [((61, 97), [0, 2]), ((61, 97), [3]), ((40, 33), [1]),
                                                       ((128, 128), [4])]
    whole, chunked = masks_at_sizes(logits, sizes), masks_at_sizes(logits, sizes, budget=1)
    for x, y, (h, w), lg in zip(whole, chunked, sizes, logits):
        one = GRESTransform.resize_mask_to(lg[None], (h, w))[0] > 0
        assert x.shape == (h, w) and torch.equal(x, one) and torch.equal(y, one)


#: Host syncs of one ``predict_batch`` on a GPU, whatever the batch size (counted on CPU by
#: tests/support/host_sync_counter.py): transformers' RoBERTa padding check in the forward, the
#: one copy of decisions, merged masks and word weights, and the one copy of the kept
#: instances' masks (none when no instance is kept: 2). Before the batched path (commit
#: 38621e0), 3 + 7 per pair + 2 per kept instance + 1 per pair keeping any: 10 for one pair
#: keeping none, 38 for five, 123 for five keeping 8 each.
PREDICT_BATCH_SYNCS = 3


def _syncs(predictor: Predictor, n: int) -> HostSyncCounter:
    pictures, texts = [p for p, _ in MIXED][:n], [t for _, t in MIXED][:n]
    predictor.predict_batch(pictures, texts, batch_size=n)  # warm: lazy state exists before counting
    with HostSyncCounter() as counter:
        predictor.predict_batch(pictures, texts, batch_size=n)
    return counter


def test_host_syncs_per_batch_not_per_sample(setup, some_kept):
    cfg, model, tokenizer, _ = setup
    predictor = Predictor(model, cfg, tokenizer, "cpu")
    one, five = _syncs(predictor, 1), _syncs(predictor, 5)
    where = f"one pair: {sorted(one.summary().items())}; five: {sorted(five.summary().items())}"
    assert one.syncs == five.syncs == PREDICT_BATCH_SYNCS, where
    assert [k for k, _, _ in five.events if k in ("h2d_blocking", "implicit_h2d", "data_dependent")] == [], where
    sites = [site.split(":")[0] for kind, _, site in five.events if kind == "d2h"]
    assert sites.count("instalign/predictor.py") == 2, where


def test_bf16_autocast_outputs_come_back_as_fp32_and_bool(setup, some_kept):
    """precision='bf16' (autocast; the weights stay fp32): the model's bf16 outputs go through the
    same post-processing and the one copy (which knows fp32 and bool, not bf16)."""
    cfg, model, tokenizer, _ = setup
    predictor = Predictor(model, cfg, tokenizer, "cpu", precision="bf16", mask_prob=True)
    assert predictor.precision == "bf16" and next(model.parameters()).dtype == torch.float32
    batched = predictor.predict_batch([p for p, _ in MIXED], [t for _, t in MIXED], batch_size=len(MIXED))
    for (picture, _), pred in zip(MIXED, batched):
        assert pred.mask.shape == pred.mask_prob.shape == (picture.height, picture.width)
        assert pred.mask.dtype == bool and pred.mask_prob.dtype == np.float32 and 0 <= pred.no_target_prob <= 1
        assert all(i.mask.dtype == bool and i.mask.shape == pred.mask.shape for i in pred.instances)
    assert any(pred.instances for pred in batched)
