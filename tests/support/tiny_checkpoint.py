"""A random tiny InstAlign saved as a checkpoint directory, for the tests that need one."""

from __future__ import annotations

import torch

from instalign.config import tiny


def make_checkpoint(path, *, seed: int = 0, score_bias: float = 0.0, no_target_bias: float = 0.0):
    """Save a seeded random tiny model at ``path`` and return the directory.

    The biases shift every query's relevance logit and the no-target logit, so that a random
    model reports instances (p̂_i > 0.5) and targets (p̂_nt < 0.5) instead of nothing.
    """
    from instalign.checkpoint import save_checkpoint
    from instalign.modeling.builders import build_model

    torch.manual_seed(seed)
    cfg = tiny()
    model = build_model(cfg.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["decoder.heads.score.bias"].add_(score_bias)
        params["no_target_head.mlp.layers.1.bias"].add_(no_target_bias)
    return save_checkpoint(path, model, cfg)
