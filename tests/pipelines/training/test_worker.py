"""One Ray Train worker's settings (``pipelines.training.worker``), without Ray.

DDP must be told exactly when a Table 3 combination leaves parameters without a gradient
(:func:`leaves_parameters_unused`, checked against real gradients of every combination). The
step loop itself runs on Ray in ``test_train.py``, ``test_fault_tolerance.py`` and ``test_multinode.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from instalign.config import load_config
from instalign.data.batch import Batch
from instalign.losses import build_criterion
from instalign.modeling.builders import build_model
from pipelines.training.worker import RunSpec, leaves_parameters_unused

S = 128


def _batch() -> Batch:
    masks = [torch.zeros(1, S, S, dtype=torch.bool), torch.zeros(0, S, S, dtype=torch.bool)]
    masks[0][0, 10:40, 10:40] = True
    return Batch(
        images=torch.randn(2, 3, S, S),
        input_ids=torch.tensor([[0, 100, 200, 2], [0, 150, 2, 1]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        instance_masks=masks,
        union_masks=torch.stack([masks[0][0], torch.zeros(S, S, dtype=torch.bool)]),
        no_target=torch.tensor([False, True]),
    )


@pytest.mark.parametrize("supervision,no_target_input,decoder", list(itertools.product(
    ["phrase_aligned", "vanilla", "none"], ["concat", "q_global", "t_sen", "mean_queries"],
    ["pot", "mask2former", "rela"])))
def test_predicate_matches_the_gradients(supervision, no_target_input, decoder):
    cfg = load_config("tiny", ["loss.nt_pos_weight=1", f"loss.instance_supervision={supervision}",
                               f"model.no_target_input={no_target_input}", f"model.decoder={decoder}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = _batch()
    out = model(batch.images, batch.input_ids, batch.attention_mask)
    build_criterion(cfg.loss)(out, batch)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert leaves_parameters_unused(cfg) == bool(unused), unused


def test_a_run_spec_refuses_an_epoch_without_steps():
    assert RunSpec(run_name="r", data_dir="/d", steps_per_epoch=1).data_order == "streaming"
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1, got 0"):
        RunSpec(run_name="r", data_dir="/d", steps_per_epoch=0)
