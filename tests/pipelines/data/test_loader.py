"""The Ray Data training loader: shapes, alignment, and agreement with ``ParquetGRES`` (real Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instalign.data.parquet import ParquetGRES
from instalign.data.transforms import GRESTransform
from instalign.modeling.text_encoder import load_tokenizer
from pipelines.data.loader import RowsToBatch, load_samples, rows_to_batch

S = 64


@pytest.fixture(scope="module")
def transform(tiny_cfg):
    return GRESTransform(image_size=S, max_tokens=tiny_cfg.model.text_encoder.max_tokens,
                         tokenizer=load_tokenizer(tiny_cfg.model.text_encoder))


@pytest.mark.ray
def test_ray_loader_equals_parquet_reader(ray_local, prepared_dataset, tiny_cfg, transform):
    """Every sample of a split, once, aligned, and identical to the plain reader's (any order)."""
    reference = ParquetGRES(str(prepared_dataset), "val", transform)
    by_id = {reference[i]["sample_id"]: reference[i] for i in range(len(reference))}
    ds = load_samples(str(prepared_dataset), "val", text_cfg=tiny_cfg.model.text_encoder, image_size=S, seed=1)
    seen = []
    for batch in ds.iter_torch_batches(batch_size=5, collate_fn=RowsToBatch("cpu")):
        b = len(batch)
        assert batch.images.shape == (b, 3, S, S) and batch.images.dtype == torch.float32
        assert batch.input_ids.shape == batch.attention_mask.shape == (b, transform.max_tokens)
        assert batch.union_masks.shape == (b, S, S)
        for i, sid in enumerate(batch.sample_ids):
            want = by_id[sid]
            seen.append(sid)
            torch.testing.assert_close(batch.images[i], transform.normalize(torch.from_numpy(want["image"].copy())[None])[0])
            np.testing.assert_array_equal(batch.input_ids[i].numpy(), want["input_ids"])
            np.testing.assert_array_equal(batch.attention_mask[i].numpy(), want["attention_mask"])
            masks = batch.instance_masks[i]
            np.testing.assert_array_equal(masks.numpy(), want["instance_masks"])
            # The union is the union of the instances; no-target samples have none and an empty union.
            assert torch.equal(batch.union_masks[i], masks.any(0) if len(masks) else torch.zeros(S, S, dtype=bool))
            assert bool(batch.no_target[i]) == want["no_target"] == (len(masks) == 0)
    assert sorted(seen) == sorted(by_id)  # each sample exactly once
    assert any(len(by_id[s]["instance_masks"]) > 1 for s in seen) and any(by_id[s]["no_target"] for s in seen)


@pytest.mark.ray
def test_ray_loader_with_a_transform_and_limit(ray_local, prepared_dataset, transform):
    ds = load_samples(str(prepared_dataset), "train", transform, shuffle=False, limit=10)
    rows = ds.take_all()
    assert len(rows) == 10 and len({r["sample_id"] for r in rows}) == 10
    for r in rows:
        assert r["image"].shape == (S, S, 3) and r["image"].dtype == np.uint8
        assert r["instance_masks"].shape == (r["num_instances"], S, S)
        assert r["instance_masks"].dtype == np.uint8 and set(np.unique(r["instance_masks"])) <= {0, 1}
        assert r["input_ids"].shape == (transform.max_tokens,) and r["input_ids"].dtype == np.int64
    batch = rows_to_batch({k: [r[k] for r in rows] if k == "instance_masks" else np.stack([r[k] for r in rows])
                           for k in rows[0]}, "cpu", transform)
    assert len(batch) == 10 and batch.images.shape == (10, 3, S, S)


def test_load_samples_argument_errors(tmp_path, tiny_cfg, transform):
    """Refused before any file is read or Ray is used: no prepared dataset (nor cluster) needed."""
    with pytest.raises(ValueError, match="exactly one of"):
        load_samples(str(tmp_path), "train")
    with pytest.raises(ValueError, match="exactly one of"):
        load_samples(str(tmp_path), "train", transform, text_cfg=tiny_cfg.model.text_encoder)
    with pytest.raises(ValueError, match="image_size"):
        load_samples(str(tmp_path), "train", text_cfg=tiny_cfg.model.text_encoder)
