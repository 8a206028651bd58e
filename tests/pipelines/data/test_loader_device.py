"""The training loader's way to the device (issue 28): pinned host memory and non-blocking copies
for a CUDA device only, and Ray Data preparing ``PREFETCH_BATCHES`` (≥ 2) batches ahead."""

from __future__ import annotations

import numpy as np
import pytest
import ray.data
import torch

from instalign.data.batch import Batch
from pipelines.data.loader import PREFETCH_BATCHES, pin_host_memory, rows_to_batch, torch_batches

S = 16


@pytest.mark.parametrize("device, want", [
    ("cuda", True), ("cuda:1", True), (torch.device("cuda", 0), True), ("cpu", False), (torch.device("cpu"), False),
])
def test_host_memory_is_pinned_for_cuda_only(device, want):
    assert pin_host_memory(device) is want


def _columns(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    masks = np.empty(n, dtype=object)
    for i in range(n):
        masks[i] = (rng.random((i % 3, S, S)) > 0.5).astype(np.uint8)  # 0, 1 or 2 instances (ragged)
    return {"image": rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8),
            "input_ids": rng.integers(0, 50, (n, 6)), "attention_mask": np.ones((n, 6), np.int64),
            "instance_masks": masks, "num_instances": np.array([i % 3 for i in range(n)]),
            "no_target": np.array([i % 3 == 0 for i in range(n)]),
            "sample_id": np.array([f"s{i}" for i in range(n)])}


def test_prefetch_is_at_least_two():
    assert PREFETCH_BATCHES >= 2


@pytest.mark.ray
def test_the_prefetch_setting_and_the_collate_reach_ray_data(ray_local, monkeypatch):
    """A real Ray Data iterator; a spy on its ``iter_torch_batches`` sees what the loader asked for."""
    seen = []
    real = ray.data.DataIterator.iter_torch_batches

    def spy(self, **kwargs):
        seen.append(kwargs)
        return real(self, **kwargs)

    monkeypatch.setattr(ray.data.DataIterator, "iter_torch_batches", spy)
    columns = _columns(7)
    rows = [{k: v[i] for k, v in columns.items()} for i in range(7)]
    shard = ray.data.from_items(rows).iterator()
    batches = list(torch_batches(shard, batch_size=3, device="cpu", drop_last=True))
    assert seen[0]["prefetch_batches"] == PREFETCH_BATCHES and seen[0]["drop_last"] is True
    assert [len(b) for b in batches] == [3, 3] and all(isinstance(b, Batch) for b in batches)
    assert batches[0].images.shape == (3, 3, S, S) and batches[0].images.dtype == torch.float32
    assert len({sid for b in batches for sid in b.sample_ids}) == 6  # 7 rows, the partial batch dropped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_the_pinned_cuda_batch_equals_the_cpu_batch():
    """On a GPU machine: the pinned, non-blocking path gives the same batch as the CPU collate."""
    columns = _columns(5)
    cpu, gpu = rows_to_batch(columns, "cpu"), rows_to_batch(columns, "cuda")
    torch.cuda.synchronize()
    assert gpu.images.device.type == "cuda"
    for name in ("images", "input_ids", "attention_mask", "union_masks", "no_target"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=0, atol=1e-6)
    for g, c in zip(gpu.instance_masks, cpu.instance_masks):
        assert torch.equal(g.cpu(), c)
