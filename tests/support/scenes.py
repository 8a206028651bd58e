"""Tiny random scenes of coloured squares, batched for the model: the engine's tests learn on them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from instalign.data.batch import Batch
from instalign.data.transforms import GRESTransform

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def scene_batch(transform: GRESTransform, seed: int, n: int = 2) -> Batch:
    """``n`` random scenes, each with a few coloured squares; the expression names one colour."""
    rng = np.random.default_rng(seed)
    s = transform.image_size
    images, texts, masks = [], [], []
    for _ in range(n):
        pixels = np.full((s, s, 3), 128, np.uint8)
        inst = {c: [] for c in COLOURS}
        for colour in rng.permutation(list(COLOURS)):
            size = int(rng.integers(s // 6, s // 3))
            y, x = (int(v) for v in rng.integers(0, s - size, size=2))
            pixels[y:y + size, x:x + size] = COLOURS[colour]
            m = np.zeros((s, s), bool)
            m[y:y + size, x:x + size] = True
            for other in inst.values():  # later shapes occlude earlier ones
                for om in other:
                    om &= ~m
            inst[colour].append(m)
        colour = str(rng.choice(list(COLOURS)))
        images.append(transform.image(Image.fromarray(pixels)))
        texts.append(f"the {colour} square")
        masks.append(transform.masks(np.stack(inst[colour])))
    ids, attn = transform.tokenize(texts)
    return Batch(images=torch.stack(images), input_ids=ids, attention_mask=attn, instance_masks=masks,
                 union_masks=torch.stack([m.any(0) for m in masks]), no_target=torch.zeros(n, dtype=torch.bool),
                 sample_ids=[f"{seed}:{i}" for i in range(n)])
