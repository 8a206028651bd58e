"""A tiny checkpoint as training writes it: weights plus optimizer / scheduler / step state."""

from __future__ import annotations

import torch

from instalign.config import tiny


def make_training_checkpoint(path, *, seed: int = 0):
    """Save a seeded random tiny model with AdamW and scheduler state after one step.

    The step uses constant gradients (no forward pass): enough for AdamW to hold its two
    moments per parameter, which is what makes a training checkpoint about three times the
    size of its weights.
    """
    from instalign.checkpoint import save_checkpoint
    from instalign.modeling.builders import build_model
    from instalign.optim import build_optimizer, build_scheduler

    torch.manual_seed(seed)
    cfg = tiny()
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)
    scheduler = build_scheduler(optimizer, total_steps=10, lr=1e-3, min_lr=1e-5)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    scheduler.step()
    return save_checkpoint(path, model, cfg, optimizer=optimizer, scheduler=scheduler, step=1, epoch=0)
