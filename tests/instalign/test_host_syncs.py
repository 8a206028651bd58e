"""Host synchronisations in one training step (docs/performance.md, "Host synchronisations").

A CPU run cannot synchronise, so ``tests/support/host_sync_counter.py`` counts the points where
the same step on a GPU would make the host wait (device→host reads, blocking host→device
copies, host tensors used in device ops, data-dependent output sizes; its docstring says
exactly what). The counts are held at their level: a new ``.item()``, a blocking index
copy or a mask check in the step fails here with the line that made it.

Measured on the tiny preset (K = 3 supervised blocks, B = 2): before, 13 per step
(matcher 2 index copies, criterion 3 per block, the costs' copy, RoBERTa's padding check)
and 14 per report (one ``.item()`` per logged metric); now 2 per step (the costs' copy
and RoBERTa's padding check, which ``transformers`` makes) and 1 per report.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.host_sync_counter import HostSyncCounter
from instalign.config import load_config, tiny
from instalign.data.transforms import GRESTransform
from instalign.engine import train_one_epoch
from instalign.losses import build_criterion
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer
from instalign.optim import build_optimizer
from tests.support.scenes import scene_batch

pytestmark = pytest.mark.usefixtures("one_thread")

#: Per training step outside logging: the Hungarian costs' device→host copy (unavoidable:
#: the solver runs on the host) and transformers' ``padding_mask.all()`` in
#: ``masking_utils._can_skip_bidirectional_mask`` (RoBERTa's SDPA mask check).
STEP_SYNCS = 2
#: Per report: every window mean read back in one copy.
REPORT_SYNCS = 1


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(tiny(), ["loss.nt_pos_weight=1"])
    transform = GRESTransform(image_size=cfg.model.image_size, max_tokens=cfg.model.text_encoder.max_tokens,
                              tokenizer=load_tokenizer(cfg.model.text_encoder))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0, backbone_lr_mult=1.0, text_encoder_lr_mult=1.0)
    return model, build_criterion(cfg.loss), optimizer, scene_batch(transform, 1)


def count(setup, steps: int) -> HostSyncCounter:
    """Sync events of an epoch of ``steps`` steps reporting once at its end."""
    model, criterion, optimizer, batch = setup
    run = dict(device="cpu", precision="fp32", grad_clip=1.0, report=lambda m, s: None, log_every=steps)
    train_one_epoch(model, criterion, optimizer, None, [batch], **run)  # AdamW's state exists before counting
    # AdamW keeps its step counters on the host (unless capturable/fused): reading them is no sync.
    host = [s["step"] for s in optimizer.state.values() if "step" in s]
    with HostSyncCounter(host) as counter:
        train_one_epoch(model, criterion, optimizer, None, [batch] * steps, **run)
    return counter


def test_one_training_step_has_two_host_syncs_and_one_per_report(setup):
    one, two = count(setup, 1), count(setup, 2)
    per_step = two.syncs - one.syncs
    where = f"one step: {sorted(one.summary().items())}"
    assert per_step == STEP_SYNCS, where
    assert one.syncs - per_step == REPORT_SYNCS, where
    kinds = {(kind, site.split(":")[0]) for (kind, site) in one.summary()}
    assert ("d2h", "instalign/losses/matcher.py") in kinds  # the costs, once for all blocks
    assert ("d2h", "instalign/engine.py") in kinds  # the report
    # The matched indices still travel, asynchronously: one copy per step for all blocks.
    assert [site for kind, _, site in one.events if kind == "h2d_async" and "losses" in site] == [
        site for kind, _, site in one.events if kind == "h2d_async" and "matcher.py" in site]
    assert sum(1 for kind, _, site in one.events if kind == "h2d_async" and "matcher.py" in site) == 1


def test_the_counter_sees_each_kind_of_sync():
    """The counter is not blind: every kind it claims to count is counted, host work is not."""
    device_tensor = torch.arange(6.0)  # made before counting: "on the device"
    with HostSyncCounter() as c:
        device_tensor.sum().item()  # d2h
        device_tensor.cpu()  # d2h
        idx = torch.tensor([0, 2])  # host
        idx.to("cpu", non_blocking=True)  # async h2d: not a sync
        idx.to(device_tensor.device)  # blocking h2d
        device_tensor[idx]  # implicit h2d
        device_tensor[device_tensor > 2]  # data-dependent size
        torch.tensor([1, 2]).tolist()  # host → host: nothing
    assert [k for k, _, _ in c.events] == ["d2h", "d2h", "h2d_async", "h2d_blocking", "implicit_h2d",
                                          "data_dependent"], c.events
    assert c.syncs == 5
