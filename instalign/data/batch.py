"""The training/eval batch: one contract between every loader and the model, criterion, metrics.

Letters: B batch, M_i instances of sample i, L tokens, S the square input side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    images: Tensor  # (B, 3, S, S) float32, normalised
    input_ids: Tensor  # (B, L) int64
    attention_mask: Tensor  # (B, L) int64, 1 for real tokens
    instance_masks: list[Tensor]  # B × (M_i, S, S) bool; M_i = 0 for a no-target sample
    union_masks: Tensor  # (B, S, S) bool: union of the sample's instance masks
    no_target: Tensor  # (B,) bool
    sample_ids: list[str] = field(default_factory=list)  # "<image_id>:<ref_id>:<sent_id>"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            images=move(self.images),
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            instance_masks=[move(m) for m in self.instance_masks],
            union_masks=move(self.union_masks),
            no_target=move(self.no_target),
        )

    @classmethod
    def from_padded(
        cls,
        *,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        instance_masks: Tensor,  # (B, M_max, S, S), padded with empty masks
        num_instances: Tensor,  # (B,) int
        no_target: Tensor,
        sample_ids: list[str] | None = None,
    ) -> "Batch":
        """Build a batch from fixed-shape arrays (what ``iter_torch_batches`` can carry)."""
        masks = instance_masks.bool()
        per_sample = [masks[i, : int(n)] for i, n in enumerate(num_instances.tolist())]
        union = masks.any(dim=1) if masks.shape[1] else torch.zeros_like(images[:, 0], dtype=torch.bool)
        return cls(
            images=images.float(),
            input_ids=input_ids.long(),
            attention_mask=attention_mask.long(),
            instance_masks=per_sample,
            union_masks=union,
            no_target=no_target.bool(),
            sample_ids=list(sample_ids or []),
        )

    def to_padded(self) -> dict[str, Any]:
        """The inverse of ``from_padded`` (fixed-shape arrays)."""
        b, _, s, _ = self.images.shape
        m_max = max([int(m.shape[0]) for m in self.instance_masks] + [1])
        padded = torch.zeros(b, m_max, s, s, dtype=torch.bool, device=self.images.device)
        for i, m in enumerate(self.instance_masks):
            padded[i, : m.shape[0]] = m
        return dict(
            images=self.images,
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            instance_masks=padded,
            num_instances=torch.tensor([m.shape[0] for m in self.instance_masks]),
            no_target=self.no_target,
            sample_ids=list(self.sample_ids),
        )


__all__ = ["Batch"]
