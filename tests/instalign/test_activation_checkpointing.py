"""``train.activation_checkpointing``: the same gradients, with activations recomputed.

Swin (timm's ``set_grad_checkpointing``) and every pixel-decoder layer
(``torch.utils.checkpoint``) run their forward a second time in the backward pass; the
gradients must equal the stored-activation ones. Stochastic depth stays ON (the tiny
preset's default): checkpointing restores the RNG state for the recomputation, so the
same paths are dropped both times. The recomputation is observed (forward calls counted),
so a flag that wires nothing fails.
"""

from __future__ import annotations

import copy

import pytest
import torch

from instalign.config import load_config, tiny
from instalign.data.transforms import GRESTransform
from instalign.losses import build_criterion
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer
from tests.support.scenes import scene_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def grads_and_calls(model, criterion, batch):
    """Gradients of one seeded step and how often a Swin stage and a decoder layer began a forward.

    Pre-hooks: a recomputation stops once it has what backward needs, before post-hooks run.
    """
    calls = {"swin": 0, "decoder": 0}

    def counter(key):
        return lambda *args: calls.__setitem__(key, calls[key] + 1)

    hooks = [model.backbone.body.layers_1.register_forward_pre_hook(counter("swin")),
             model.pixel_decoder.layers[0].register_forward_pre_hook(counter("decoder"))]
    torch.manual_seed(3)
    criterion(model(batch.images, batch.input_ids, batch.attention_mask), batch)["loss"].backward()
    for h in hooks:
        h.remove()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls


def test_checkpointed_gradients_equal_the_stored_ones():
    cfg = load_config(tiny(), ["loss.nt_pos_weight=1"])
    transform = GRESTransform(image_size=cfg.model.image_size, max_tokens=cfg.model.text_encoder.max_tokens,
                              tokenizer=load_tokenizer(cfg.model.text_encoder))
    batch = scene_batch(transform, 2)
    torch.manual_seed(0)
    plain = build_model(cfg.model).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_activation_checkpointing(True)
    criterion = build_criterion(cfg.loss)
    want, plain_calls = grads_and_calls(plain, criterion, batch)
    got, ckpt_calls = grads_and_calls(ckpt, criterion, batch)
    assert plain_calls == {"swin": 1, "decoder": 1}
    assert ckpt_calls == {"swin": 2, "decoder": 2}, ckpt_calls  # recomputed in backward
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-6, msg=name)
    # Off again, and never in eval/no-grad: no recomputation.
    ckpt.set_activation_checkpointing(False)
    assert grads_and_calls(ckpt, criterion, batch)[1] == {"swin": 1, "decoder": 1}


def test_the_flag_is_a_train_setting_off_by_default():
    assert tiny().train.activation_checkpointing is False
    assert load_config(tiny(), ["train.activation_checkpointing=true"]).train.activation_checkpointing is True
