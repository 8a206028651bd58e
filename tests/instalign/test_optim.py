"""``instalign.optim``: the paper's linear decay (§4.1) on torch's ``LinearLR``, and its resume."""

from __future__ import annotations

import json

import pytest
import torch

from instalign.checkpoint import load_training_state, save_checkpoint
from instalign.config import tiny
from instalign.modeling.builders import build_model
from instalign.optim import build_optimizer, build_scheduler, freeze_zero_rate_parts, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    return build_optimizer(model, lr=lr, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)


def _rates(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[list[float]]:
    """Each group's rate before each of ``steps`` optimizer steps."""
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # no gradients: a no-op step, in the order torch expects
        scheduler.step()
    return rates


def test_the_schedule_is_torchs_linear_lr():
    scheduler = build_scheduler(_optimizer(), total_steps=10, lr=1e-3, min_lr=1e-5)
    assert type(scheduler) is torch.optim.lr_scheduler.LinearLR
    assert (scheduler.start_factor, scheduler.end_factor, scheduler.total_iters) == (1.0, pytest.approx(1e-2), 10)


def test_scheduler_decays_linearly_per_group():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, total_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [r[0] for r in _rates(optimizer, scheduler, 12)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx((1e-3 + 1e-5) / 2)
    for t in range(11):  # every step on the line of §4.1, not only its ends
        assert lrs[t] == pytest.approx(1e-3 + (1e-5 - 1e-3) * t / 10, rel=1e-9)
    assert lrs[10] == pytest.approx(1e-5) and lrs[11] == pytest.approx(1e-5)  # flat after the end
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(optimizer, total_steps=0, lr=1e-3, min_lr=0.0)


def test_every_group_decays_by_the_same_factor():
    optimizer = build_optimizer(torch.nn.Linear(4, 4, bias=False), lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1,
                                text_encoder_lr_mult=0.1)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": 1e-4, "lr_mult": 0.1})
    scheduler = build_scheduler(optimizer, total_steps=4, lr=1e-3, min_lr=1e-5)
    for decoder, encoder in _rates(optimizer, scheduler, 6)[1:]:
        assert encoder == pytest.approx(decoder * 0.1, rel=1e-9)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-6])


def test_min_lr_zero_decays_to_exactly_zero_and_min_lr_equal_to_lr_is_constant():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, total_steps=4, lr=1e-3, min_lr=0.0)
    lrs = [r[0] for r in _rates(optimizer, scheduler, 6)]
    assert lrs[:4] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-9)
    assert lrs[4] == lrs[5] == 0.0

    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, total_steps=4, lr=1e-3, min_lr=1e-3)
    assert [r[0] for r in _rates(optimizer, scheduler, 6)] == [1e-3] * 6


@pytest.mark.parametrize("lr, min_lr", [(1e-3, 2e-3), (1e-3, -1e-6)])
def test_min_lr_outside_zero_to_lr_is_refused(lr, min_lr):
    with pytest.raises(ValueError, match=r"0 <= min_lr <= lr"):
        build_scheduler(_optimizer(lr), total_steps=4, lr=lr, min_lr=min_lr)


def test_scheduler_state_survives_json_and_continues_the_curve():
    # The checkpoint stores the scheduler's state as JSON (no pickles): resume mid-decay.
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, total_steps=10, lr=1e-3, min_lr=1e-5)
    _rates(optimizer, scheduler, 4)
    saved_opt, saved_sched = optimizer.state_dict(), json.loads(json.dumps(scheduler.state_dict()))
    expected = _rates(optimizer, scheduler, 8)

    resumed = _optimizer()
    resumed_sched = build_scheduler(resumed, total_steps=10, lr=1e-3, min_lr=1e-5)
    resumed.load_state_dict(saved_opt)
    resumed_sched.load_state_dict(saved_sched)
    assert sum(_rates(resumed, resumed_sched, 8), []) == pytest.approx(sum(expected, []), rel=1e-12)


def test_param_groups_see_through_torch_compile():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    kwargs = dict(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)
    plain = param_groups(model, **kwargs)
    compiled = param_groups(torch.compile(model), **kwargs)  # compiles lazily: nothing runs here
    assert [(g["name"], [id(p) for p in g["params"]]) for g in compiled] == \
        [(g["name"], [id(p) for p in g["params"]]) for g in plain]


class _OldLinearDecay:
    """The factor function checkpoints before ``LinearLR`` were written with (``LambdaLR``)."""

    def __init__(self, total_steps: int, end_factor: float):
        self.total_steps, self.end_factor = total_steps, end_factor

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.total_steps) / self.total_steps
        return (1.0 - t) + t * self.end_factor


def test_a_checkpoint_with_the_old_lambda_lr_state_resumes_on_the_same_curve(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    kwargs = dict(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)
    optimizer = build_optimizer(model, **kwargs)
    old = torch.optim.lr_scheduler.LambdaLR(optimizer, _OldLinearDecay(10, 1e-2))
    _rates(optimizer, old, 3)
    save_checkpoint(tmp_path / "step_3", model, cfg, optimizer=optimizer, scheduler=old, step=3)
    saved = json.loads((tmp_path / "step_3" / "training_state.json").read_text())["scheduler"]
    assert "lr_lambdas" in saved  # really the old format
    expected = _rates(optimizer, old, 10)

    resumed = build_optimizer(model, **kwargs)
    scheduler = build_scheduler(resumed, total_steps=10, lr=1e-3, min_lr=1e-5)
    assert load_training_state(tmp_path / "step_3", resumed, scheduler)["step"] == 3
    assert scheduler.last_epoch == 3
    assert sum(_rates(resumed, scheduler, 10), []) == pytest.approx(sum(expected, []), rel=1e-12)


@pytest.mark.parametrize("backbone_mult, text_mult, frozen", [(1.0, 0.0, ["text_encoder"]), (0.0, 1.0, ["backbone"]),
                                                               (0.1, 0.1, [])])
def test_a_multiplier_of_zero_freezes_that_pretrained_part(backbone_mult, text_mult, frozen):
    torch.manual_seed(0)
    model = build_model(tiny().model)
    mults = dict(backbone_lr_mult=backbone_mult, text_encoder_lr_mult=text_mult)
    assert freeze_zero_rate_parts(model, **mults) == frozen
    assert all(p.requires_grad for p in model.text_encoder.proj.parameters())  # new: trains at the full rate
    assert all(p.requires_grad != ("text_encoder" in frozen) for p in model.text_encoder.encoder.parameters())
    assert all(p.requires_grad != ("backbone" in frozen) for p in model.backbone.parameters())
    names = {g["name"].removesuffix("_no_decay") for g in param_groups(model, lr=1e-3, weight_decay=0.05, **mults)}
    assert names == {"backbone", "text_encoder", "decoder"} - set(frozen)

    ids = torch.tensor([[1, 2, 3]])
    model.text_encoder(ids, torch.ones_like(ids)).sum().backward()
    grads = [p.grad is not None for p in model.text_encoder.encoder.parameters()]
    assert (not any(grads)) if "text_encoder" in frozen else any(grads)
    assert model.text_encoder.proj.weight.grad is not None
