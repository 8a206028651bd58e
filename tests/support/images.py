"""Small image files for tests: a PNG of random pixels, the same bytes for the same seed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A ``width`` × ``height`` RGB PNG of uniform random pixels (seeded: reproducible bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
