"""Multi-scale deformable attention: the grid_sample paths against an explicit bilinear loop and each other.

The lean path ("pytorch") must equal the naive reference (forward and every gradient), keep
≥ 4× fewer bytes for backward and never build the (…, L·P) stack; "auto" dispatches to a
registered kernel only where its availability predicate says it can run.
"""

from __future__ import annotations

import math

import pytest
import torch

from instalign.config import ConfigError, load_config
from instalign.modeling import ms_deform_attn as msda
from instalign.modeling.ms_deform_attn import (
    MSDeformAttn,
    available_implementations,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    ms_deform_attn_reference,
    register_ms_deform_attn_impl,
)
from instalign.modeling.ms_deform_attn_memory import (
    largest_intermediate_bytes,
    level_shapes,
    op_inputs,
    saved_tensor_bytes,
)


def reference(value, shapes, locations, weights):
    """Obviously-correct MSDA: per (b, q, m, l, p) bilinear interpolation with zero padding.

    Pixel (i, j) of an H×W level has its centre at ((j + 0.5) / W, (i + 0.5) / H).
    """
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, q, m, d, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li, (h, w) in enumerate(shapes):
                    level = value[bi, starts[li]:starts[li + 1], mi].double().view(h, w, d)

                    def pixel(y, x):
                        if 0 <= y < h and 0 <= x < w:
                            return level[y, x]
                        return torch.zeros(d, dtype=torch.float64)

                    for pi in range(n_points):
                        x = locations[bi, qi, mi, li, pi, 0].item() * w - 0.5
                        y = locations[bi, qi, mi, li, pi, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = (
                            pixel(y0, x0) * (1 - fx) * (1 - fy)
                            + pixel(y0, x0 + 1) * fx * (1 - fy)
                            + pixel(y0 + 1, x0) * (1 - fx) * fy
                            + pixel(y0 + 1, x0 + 1) * fx * fy
                        )
                        out[bi, qi, mi] += weights[bi, qi, mi, li, pi].item() * sample
    return out.view(b, q, m * d)


def random_inputs(seed=0, b=2, q=5, m=2, d=3, shapes=((3, 4), (2, 2), (1, 3)), p=2):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=g)
    # some points fall outside [0, 1] to exercise the zero padding
    locations = torch.rand(b, q, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(b, q, m, len(shapes), p, generator=g)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    return value, list(shapes), locations, weights


@pytest.mark.parametrize("fn", [ms_deform_attn_pytorch, ms_deform_attn_reference])
def test_pytorch_paths_match_bilinear_loop(fn):
    value, shapes, locations, weights = random_inputs()
    got = fn(value, shapes, locations, weights)
    want = reference(value, shapes, locations, weights)
    assert got.shape == (2, 5, 6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_exact_pixel_centres_return_the_pixel():
    value, shapes, _, _ = random_inputs(b=1, q=1, m=1, d=2, shapes=((3, 4),), p=1)
    # the centre of pixel (row 2, col 1) with all weight on it
    loc = torch.tensor([(1 + 0.5) / 4, (2 + 0.5) / 3]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn(value, shapes, None, loc, torch.ones(1, 1, 1, 1, 1))
    torch.testing.assert_close(out.view(-1), value[0, 2 * 4 + 1, 0])


def test_dispatch_tensor_shapes_and_unknown_impl():
    value, shapes, locations, weights = random_inputs(seed=1)
    start = torch.tensor([0, 12, 16])
    a = ms_deform_attn(value, torch.tensor(shapes), start, locations, weights, impl="auto")
    b = ms_deform_attn(value, shapes, start, locations, weights, impl="pytorch")
    torch.testing.assert_close(a, b)
    assert {"pytorch", "reference"} <= set(available_implementations())
    with pytest.raises(ValueError, match="unknown impl 'cuda-kernel'"):
        ms_deform_attn(value, shapes, start, locations, weights, impl="cuda-kernel")


def test_module_init_gradients_and_autocast():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, num_levels=2, num_heads=4, num_points=3)
    # Deformable DETR init: offsets start on one ray per head, point k at distance k
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    assert torch.allclose(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(bias[0, 0, :, 1], torch.zeros(3), atol=1e-6)
    shapes = [(4, 4), (2, 2)]
    x = torch.randn(2, 20, 16, requires_grad=True)
    ref = torch.rand(1, 20, 2, 2)
    out = attn(x, ref, x, shapes)
    assert out.shape == (2, 20, 16)
    out.square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x, ref, x, shapes)
    torch.testing.assert_close(low.float(), out, rtol=0.05, atol=0.05)


def test_dim_must_split_into_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MSDeformAttn(dim=10, num_levels=1, num_heads=4, num_points=1)


def _forward_and_grads(fn, value, shapes, locations, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    # a random cotangent, so no gradient hides behind a symmetric loss
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out, leaves, cotangent)
    return out, grads


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("query_chunk", [None, 3, 7])
def test_lean_path_equals_reference_forward_and_gradients(checkpoint, query_chunk):
    # 11 queries: chunks of 3 and 7 leave a ragged last chunk; ~30 % of the points are out of range
    value, shapes, locations, weights = random_inputs(seed=3, b=2, q=11, m=3, d=4, shapes=((5, 6), (3, 3), (2, 4)), p=3)
    want, want_grads = _forward_and_grads(ms_deform_attn_reference, value, shapes, locations, weights)

    def lean(*args):
        return ms_deform_attn_pytorch(*args, query_chunk=query_chunk, checkpoint=checkpoint)

    got, got_grads = _forward_and_grads(lean, value, shapes, locations, weights)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, g, w in zip(("value", "sampling_locations", "attention_weights"), got_grads, want_grads):
        assert w.abs().sum() > 0, name  # the comparison means something
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m: f"d/d{name}: {m}")


def test_lean_path_rejects_a_bad_chunk():
    value, shapes, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="query_chunk must be >= 1"):
        ms_deform_attn_pytorch(value, shapes, locations, weights, query_chunk=0)


def _paper_like_op(fn):
    """Paper widths (M=8 heads of D=32, L=3 levels, P=4) at a 128² image: 336 tokens, runs in well under a second."""
    shapes = level_shapes(128)
    value, locations, weights = op_inputs(1, shapes, heads=8, head_dim=32, points=4)
    return lambda: fn(value, shapes, locations, weights)


def test_lean_path_saves_4x_fewer_bytes_for_backward():
    _, naive = saved_tensor_bytes(_paper_like_op(ms_deform_attn_reference))
    _, lean = saved_tensor_bytes(_paper_like_op(ms_deform_attn_pytorch))
    value, locations, weights = op_inputs(1, level_shapes(128), heads=8, head_dim=32, points=4)
    inputs = sum(t.numel() * t.element_size() for t in (value, locations, weights))
    assert lean <= inputs  # the recompute keeps the op's inputs and nothing else
    assert naive >= 4 * lean, (naive, lean)


def test_lean_path_never_builds_the_level_point_stack():
    # the reference's largest tensor is the (B·M, D, Q, L·P) stack; the lean path's is one level's samples
    naive = largest_intermediate_bytes(_paper_like_op(ms_deform_attn_reference))
    lean = largest_intermediate_bytes(_paper_like_op(ms_deform_attn_pytorch))
    stack = 1 * 8 * 32 * 336 * 3 * 4 * 4
    assert naive >= stack
    assert lean <= stack // 3, (lean, stack)
    chunked = largest_intermediate_bytes(_paper_like_op(lambda *a: ms_deform_attn_pytorch(*a, query_chunk=112)))
    assert chunked < lean


def test_bf16_values_sample_in_fp32_without_keeping_an_fp32_copy():
    value, shapes, locations, weights = random_inputs(seed=5, b=1, q=9, m=2, d=8, p=2)
    low = value.bfloat16()
    got = ms_deform_attn_pytorch(low, shapes, locations, weights)
    assert got.dtype == torch.bfloat16
    # fp32 sampling and accumulation of the bf16 values: only the final rounding to bf16 differs
    want = ms_deform_attn_reference(low.float(), shapes, locations, weights)
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-6)
    leaves = lambda v: (v.requires_grad_(), locations.clone().requires_grad_(), weights.clone())  # noqa: E731
    _, saved_bf16 = saved_tensor_bytes(lambda: ms_deform_attn_pytorch(*_order(leaves(low.clone()), shapes)))
    _, saved_fp32 = saved_tensor_bytes(lambda: ms_deform_attn_pytorch(*_order(leaves(value.clone()), shapes)))
    assert saved_fp32 - saved_bf16 == value.numel() * 2  # the value is kept in bf16, the upcast is recomputed


def _order(tensors, shapes):
    value, locations, weights = tensors
    return value, shapes, locations, weights


class _Recorder:
    """A real kernel stand-in: the reference under another name, remembering that it ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        self.calls += 1
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the implementation registry, so registrations end with the test."""
    monkeypatch.setattr(msda, "_IMPLEMENTATIONS", dict(msda._IMPLEMENTATIONS))


def test_auto_picks_a_registered_kernel_only_where_it_is_available(registry):
    kernel = _Recorder()
    register_ms_deform_attn_impl("fused-double", kernel, available=lambda v: v.dtype == torch.float64)
    value, shapes, locations, weights = random_inputs(seed=2)
    assert "fused-double" in available_implementations()

    out64 = ms_deform_attn(value.double(), shapes, None, locations.double(), weights.double(), impl="auto")
    assert kernel.calls == 1 and out64.dtype == torch.float64
    assert msda.resolve_implementation("auto", value.double()) == "fused-double"

    out32 = ms_deform_attn(value, shapes, None, locations, weights, impl="auto")  # unavailable: lean fallback
    assert kernel.calls == 1
    assert msda.resolve_implementation("auto", value) == "pytorch"
    torch.testing.assert_close(out32, ms_deform_attn_pytorch(value, shapes, locations, weights))
    with pytest.raises(ValueError, match="impl 'fused-double' cannot run on torch.float32"):
        ms_deform_attn(value, shapes, None, locations, weights, impl="fused-double")


@pytest.mark.parametrize("name", ["auto", "pytorch", "reference"])
def test_builtin_names_cannot_be_registered_over(registry, name):
    with pytest.raises(ValueError, match="reserved"):
        register_ms_deform_attn_impl(name, _Recorder(), available=lambda v: True)


def test_module_impls_agree_and_config_accepts_reference():
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2)]
    x = torch.randn(2, 20, 16)
    ref = torch.rand(1, 20, 2, 2)
    results = {}
    for impl in ("reference", "pytorch", "auto"):
        torch.manual_seed(1)
        attn = MSDeformAttn(dim=16, num_levels=2, num_heads=4, num_points=3, impl=impl)
        nn_init_random(attn)
        xi = x.clone().requires_grad_()
        out = attn(xi, ref, xi, shapes)
        out.square().sum().backward()
        results[impl] = (out, xi.grad, attn.sampling_offsets.weight.grad)
    for impl in ("pytorch", "auto"):
        for got, want in zip(results[impl], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert load_config("tiny", ["model.pixel_decoder.attention_impl=reference"]).model.pixel_decoder.attention_impl == "reference"
    with pytest.raises(ConfigError, match="attention_impl"):
        load_config("tiny", ["model.pixel_decoder.attention_impl=cuda"])


def nn_init_random(attn):
    """Non-zero offset and weight projections (the init zeroes them), so every path is exercised."""
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)

