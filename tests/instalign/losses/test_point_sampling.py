"""Point sampling (``instalign.losses.point_sampling``): bilinear reads at points, and the
uncertain points the mask losses are computed on (Mask2Former's importance sampling)."""

from __future__ import annotations

import torch

from instalign.losses import point_sample, uncertain_points


def test_point_sample_reads_pixel_centres_exactly_and_replicates_the_border():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    coords = torch.tensor([[[0.125, 0.125], [0.875, 0.375], [0.0, 0.0], [1.0, 1.0]]])  # (x, y)
    out = point_sample(x, coords)
    assert out.shape == (1, 1, 4)
    assert out[0, 0].tolist() == [0.0, 7.0, 0.0, 15.0]  # corners take the edge pixel, not zero padding


def test_importance_sampling_concentrates_on_the_boundary():
    # A logit ramp across x: uncertainty -|logit| grows toward the boundary at x = 0.5.
    logits = (torch.linspace(-8, 8, 16).view(1, 1, 1, 16)).expand(2, 1, 16, 16).contiguous()
    g = torch.Generator().manual_seed(0)
    pts = uncertain_points(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75, generator=g)
    assert pts.shape == (2, 100, 2) and pts.min() >= 0 and pts.max() <= 1
    near = (pts[..., 0] - 0.5).abs()
    # The 75 most uncertain of 300 uniform candidates: about the central quarter of the width.
    assert near[:, :75].max() < 0.2
    assert near[:, 75:].mean() > 0.15  # the other 25 are fresh uniform points (mean 0.25)
    uniform = uncertain_points(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.0, generator=g)
    assert (uniform[..., 0] - 0.5).abs().mean() > 0.15


def test_point_sample_of_bf16_is_the_upcast_bilinear_read_in_fp32():
    """A bf16 map is read as its fp32 copy at fp32 points (border mode included); the
    result is fp32. A bf16 ``grid_sample`` would round the values and the points (~1e-2 off)."""
    g = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(6, 5, 30, 20, generator=g)).bfloat16()
    coords = torch.rand(6, 700, 2, generator=g)
    coords[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # border corners
    got = point_sample(x, coords)
    want = point_sample(x.float(), coords)
    assert got.dtype == torch.float32 and got.shape == want.shape == (6, 5, 700)
    assert torch.equal(got, want)
    # Gradients reach the bf16 map at the same pixels with the same bilinear weights.
    leaf_x = x.clone().requires_grad_(True)
    point_sample(leaf_x, coords).sum().backward()
    leaf_f = x.float().requires_grad_(True)
    point_sample(leaf_f, coords).sum().backward()
    assert torch.equal(leaf_x.grad, leaf_f.grad.bfloat16())
