"""The sine positional encoding (``instalign.modeling.position_encoding``), against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from instalign.modeling.position_encoding import PositionEmbeddingSine


def test_the_encoding_is_sin_and_cos_of_the_normalised_position():
    pos = PositionEmbeddingSine(num_pos_feats=4)(torch.zeros(2, 7, 3, 5))
    assert pos.shape == (1, 8, 3, 5) and pos.dtype == torch.float32
    y, x = 2, 4  # row 3 of 3, column 5 of 5: normalised to (almost) 2π
    ny, nx = 3 / (3 + 1e-6) * 2 * math.pi, 5 / (5 + 1e-6) * 2 * math.pi
    freq = [10000 ** (2 * (i // 2) / 4) for i in range(4)]
    want_y = [math.sin(ny / freq[0]), math.cos(ny / freq[1]), math.sin(ny / freq[2]), math.cos(ny / freq[3])]
    want_x = [math.sin(nx / freq[0]), math.cos(nx / freq[1]), math.sin(nx / freq[2]), math.cos(nx / freq[3])]
    torch.testing.assert_close(pos[0, :, y, x], torch.tensor(want_y + want_x))
    assert PositionEmbeddingSine(num_pos_feats=4)(torch.zeros(1, 1, 3, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_an_odd_channel_count_is_refused():
    with pytest.raises(ValueError, match="num_pos_feats=3 must be even"):
        PositionEmbeddingSine(num_pos_feats=3)
