"""The memory counters behind ``instalign bench model --deform-memory``
(``instalign.modeling.ms_deform_attn_memory``), checked on computations whose figures are known."""

from __future__ import annotations

import torch

from instalign.modeling.ms_deform_attn_memory import largest_intermediate_bytes, level_shapes, saved_tensor_bytes


def test_saved_bytes_count_each_storage_autograd_keeps_once():
    x = torch.randn(100, requires_grad=True)
    y = torch.randn(100, requires_grad=True)
    out, saved = saved_tensor_bytes(lambda: (x * y).sum())  # mul saves both operands
    assert saved == 2 * 100 * 4 and out.requires_grad
    _, saved = saved_tensor_bytes(lambda: (x * x).sum())  # the same storage, counted once
    assert saved == 100 * 4
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: (x * y).sum())[1] == 0


def test_the_largest_intermediate_is_the_biggest_tensor_made():
    x = torch.randn(10, requires_grad=True)
    assert largest_intermediate_bytes(lambda: x[:, None] * x[None, :]) == 10 * 10 * 4  # the outer product


def test_the_levels_are_the_strides_32_16_8_of_the_image_coarse_first():
    assert level_shapes(480) == [(15, 15), (30, 30), (60, 60)]
