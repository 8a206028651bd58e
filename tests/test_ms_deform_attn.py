"""Multi-scale deformable attention: the grid_sample path against an explicit bilinear loop."""

from __future__ import annotations

import math

import pytest
import torch

from instalign.modeling.ms_deform_attn import (
    MSDeformAttn,
    available_implementations,
    ms_deform_attn,
    ms_deform_attn_pytorch,
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


def test_pytorch_path_matches_bilinear_reference():
    value, shapes, locations, weights = random_inputs()
    got = ms_deform_attn_pytorch(value, shapes, locations, weights)
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
    assert "pytorch" in available_implementations()
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
