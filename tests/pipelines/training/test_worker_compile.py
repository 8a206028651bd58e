"""Validation runs the model the way training does (issue 28): compiled when training is compiled,
never through DDP's hooks. ``pipelines.training.worker.eval_model``, without Ray."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipelines.training.worker import eval_model


def test_an_eager_model_validates_as_itself():
    model = nn.Linear(3, 2)
    assert eval_model(model) is model


def test_a_compiled_model_validates_compiled_on_the_same_weights():
    """The old worker unwrapped ``torch.compile`` too, so a compiled run validated eagerly."""
    model = nn.Linear(3, 2)
    validated = eval_model(torch.compile(model))
    assert validated is not model and validated._orig_mod is model  # compiled, same parameters
    assert isinstance(validated, type(torch.compile(nn.Linear(1, 1))))


def test_ddp_is_dropped_and_compile_kept(tmp_path):
    """The worker's order: ``prepare_model`` (DDP), then ``torch.compile``; validation drops DDP only."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = nn.Linear(3, 2)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert eval_model(ddp) is model
        validated = eval_model(torch.compile(ddp))
        assert validated._orig_mod is model
        assert not any(isinstance(m, nn.parallel.DistributedDataParallel) for m in validated.modules())
    finally:
        dist.destroy_process_group()
