"""The predictor: inputs of every kind, original-size outputs, batching, explanations, errors."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from instalign.checkpoint import save_checkpoint
from instalign.config import load_config, tiny
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer
from instalign.predictor import Prediction, Predictor, _token_words, load_image


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
    return cfg, model, tokenizer, Predictor(model, cfg, tokenizer, "cpu")


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
    loaded = Predictor.from_checkpoint(directory, device="cpu")
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
