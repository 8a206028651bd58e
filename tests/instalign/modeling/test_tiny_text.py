"""The tiny text encoder of the ``tiny`` preset (``instalign.modeling.tiny_text``): built once into
the cache, deterministically, offline, and loaded like any Hugging Face RoBERTa."""

from __future__ import annotations

import json

import torch

from instalign.config import TINY_TEXT_ENCODER, TextEncoderConfig
from instalign.modeling import load_tokenizer
from instalign.modeling.text_encoder import create_text_encoder
from instalign.modeling.tiny_text import VERSION, corpus, ensure_tiny_roberta


def test_tiny_roberta_is_written_once_deterministically_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTALIGN_CACHE", str(tmp_path / "a"))
    first = ensure_tiny_roberta()
    assert first == tmp_path / "a" / "tiny-roberta"
    assert json.loads((first / "_SEALED.json").read_text())["meta"]["version"] == VERSION
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_roberta() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    second = ensure_tiny_roberta(tmp_path / "b" / "tiny-roberta")
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tiny-roberta.tmp")]  # no temp dirs left

    tokenizer = load_tokenizer(TextEncoderConfig(name=TINY_TEXT_ENCODER, pretrained=False))
    assert type(tokenizer).__name__.startswith("RobertaTokenizer")
    # a real BPE trained on referring-expression words: they are single tokens, not bytes
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("the red square on the left")["input_ids"])
    assert tokens == ["<s>", "the", "Ġred", "Ġsquare", "Ġon", "Ġthe", "Ġleft", "</s>"]
    enc = tokenizer(["a small blue circle", "zebra"], padding="max_length", max_length=20, truncation=True,
                    return_tensors="pt")

    random_init = create_text_encoder(name=TINY_TEXT_ENCODER, pretrained=False, hidden_dim=16, max_tokens=20)
    cfg = random_init.encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 2, 4, 64)
    assert cfg.max_position_embeddings >= 20 + 2 and random_init.encoder.pooler is None
    words = random_init(enc["input_ids"], enc["attention_mask"])
    assert words.shape == (2, 20, 16) and torch.isfinite(words).all()
    # pretrained=True reads the saved (seeded) weights through from_pretrained
    a = create_text_encoder(name=TINY_TEXT_ENCODER, pretrained=True, hidden_dim=16, max_tokens=20)
    b = create_text_encoder(name=TINY_TEXT_ENCODER, pretrained=True, hidden_dim=16, max_tokens=20)
    torch.testing.assert_close(a.encoder.embeddings.word_embeddings.weight, b.encoder.embeddings.word_embeddings.weight)


def test_the_corpus_is_fixed_and_made_of_referring_expressions():
    lines = corpus()
    assert lines == corpus() and len(lines) > 1000  # the tokenizer trained on it is the same every time
    assert "the red square on the left" in lines
