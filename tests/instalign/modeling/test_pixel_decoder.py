"""The pixel decoder (``instalign.modeling.pixel_decoder``): four backbone maps in, the mask features
at stride 4 and three scales for the decoder out; reference points at pixel centres."""

from __future__ import annotations

import torch

from instalign.modeling.pixel_decoder import MSDeformAttnPixelDecoder


def test_shapes_in_and_out_and_gradients_to_every_input(one_thread):
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(in_channels=[8, 16, 24, 32], hidden_dim=16, mask_dim=12, num_layers=1,
                                       num_heads=2, num_points=2, ffn_dim=32, dropout=0.0)
    features = [torch.randn(2, c, 32 // s, 32 // s, requires_grad=True) for c, s in zip([8, 16, 24, 32], [1, 2, 4, 8])]
    mask_features, multi_scale = decoder(features)
    assert mask_features.shape == (2, 12, 32, 32)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 16, 4, 4), (2, 16, 8, 8), (2, 16, 16, 16)]
    (mask_features.sum() + sum(m.sum() for m in multi_scale)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_reference_points_are_the_pixel_centres_of_every_level():
    ref = MSDeformAttnPixelDecoder.reference_points([(2, 2), (1, 1)], torch.device("cpu"))
    assert ref.shape == (1, 5, 2, 2)
    assert ref[0, :, 0].tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.5, 0.5]]
