"""The training/eval batch (``instalign.data.batch``): fixed-shape arrays and back, and moves."""

from __future__ import annotations

import torch

from instalign.data.batch import Batch


def padded() -> dict:
    masks = torch.zeros(3, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[0, 1, :, :1] = True
    masks[2, 0, 3, 3] = True
    return dict(images=torch.randn(3, 3, 4, 4), input_ids=torch.ones(3, 5, dtype=torch.int32),
                attention_mask=torch.ones(3, 5, dtype=torch.int32), instance_masks=masks,
                num_instances=torch.tensor([2, 0, 1]), no_target=torch.tensor([0, 1, 0]), sample_ids=["a", "b", "c"])


def test_from_padded_cuts_each_sample_to_its_instances_and_unions_them():
    batch = Batch.from_padded(**padded())
    assert len(batch) == 3 and [len(m) for m in batch.instance_masks] == [2, 0, 1]
    assert batch.union_masks[0].sum() == 8 + 4 - 2 and not batch.union_masks[1].any()
    assert batch.no_target.tolist() == [False, True, False] and batch.input_ids.dtype == torch.int64


def test_to_padded_is_the_inverse():
    batch = Batch.from_padded(**padded())
    again = Batch.from_padded(**batch.to_padded())
    assert all(torch.equal(a, b) for a, b in zip(batch.instance_masks, again.instance_masks))
    assert torch.equal(batch.union_masks, again.union_masks) and again.sample_ids == ["a", "b", "c"]


def test_a_batch_of_no_target_samples_only_pads_to_one_empty_mask():
    batch = Batch.from_padded(**{**padded(), "instance_masks": torch.zeros(3, 0, 4, 4, dtype=torch.bool),
                                 "num_instances": torch.zeros(3, dtype=torch.int64)})
    assert not batch.union_masks.any() and batch.to_padded()["instance_masks"].shape == (3, 1, 4, 4)
    moved = batch.to("cpu")
    assert moved is not batch and moved.images is batch.images  # same device: tensors reused
