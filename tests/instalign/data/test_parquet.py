"""``ParquetGRES`` / ``collate``: prepared Parquet → samples and batches without Ray.

The data come from the shared ``prepared_dataset`` (made once by Ray Data); everything
checked here is plain pyarrow + PyTorch.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from instalign.data.images import decode_image, open_image
from instalign.data.masks import segmentation_to_rle, rle_decode
from instalign.data.parquet import DatasetFormatError, ParquetGRES, collate, columns_to_batch, read_manifest
from instalign.data.records import MANIFEST_NAME
from instalign.data.transforms import GRESTransform
from instalign.modeling.text_encoder import load_tokenizer

S = 64


@pytest.fixture(scope="module")
def transform(tiny_cfg):
    return GRESTransform(image_size=S, max_tokens=tiny_cfg.model.text_encoder.max_tokens,
                         tokenizer=load_tokenizer(tiny_cfg.model.text_encoder))


@pytest.fixture(scope="module")
def source(synthetic_root):
    inst = json.loads((synthetic_root / "grefcoco" / "instances.json").read_text())
    refs = json.loads((synthetic_root / "grefcoco" / "grefs(unc).json").read_text())
    return dict(anns={a["id"]: a for a in inst["annotations"]}, images={i["id"]: i for i in inst["images"]},
                refs={r["ref_id"]: r for r in refs})


def test_samples_match_the_source(prepared_dataset, transform, source, synthetic_root):
    ds = ParquetGRES(str(prepared_dataset), "train", transform)
    manifest = read_manifest(str(prepared_dataset))
    assert len(ds) == manifest["counts"]["train"]["samples"]
    ids = [ds[i]["sample_id"] for i in range(len(ds))]
    assert len(set(ids)) == len(ids)
    for i in range(len(ds)):
        item = ds[i]
        image_id, ref_id, sent_id = (int(x) for x in item["sample_id"].split(":"))
        ref, info = source["refs"][ref_id], source["images"][image_id]
        text = next(s["raw"] for s in ref["sentences"] if s["sent_id"] == sent_id)
        assert item["image"].shape == (S, S, 3) and item["image"].dtype == np.uint8
        # Token ids: the transform's tokenizer on the sentence, padded to max_tokens.
        want_ids, want_mask = transform.tokenize([text])
        np.testing.assert_array_equal(item["input_ids"], want_ids[0].numpy())
        np.testing.assert_array_equal(item["attention_mask"], want_mask[0].numpy())
        # Masks: the source annotation rasterised at the original size, resized like the image.
        ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        ann_ids = [] if ann_ids == [-1] else ann_ids
        assert item["no_target"] == (not ann_ids) and item["num_instances"] == len(ann_ids)
        assert item["instance_masks"].shape == (len(ann_ids), S, S) and item["instance_masks"].dtype == bool
        for k, a in enumerate(ann_ids):
            full = rle_decode(segmentation_to_rle(source["anns"][a]["segmentation"], info["height"], info["width"])
                              ["counts"], info["height"], info["width"])
            np.testing.assert_array_equal(item["instance_masks"][k], transform.masks(full[None])[0].numpy())
        if not ann_ids:
            assert not item["instance_masks"].any()
    # The image: the source JPEG through the same transform (JPEG draft decoding allowed, as
    # GRESTransform.draft_size says; within a few grey levels of a full-size decode).
    first = ds[0]
    path = synthetic_root / "images" / "train2014" / f"COCO_train2014_{int(first['sample_id'].split(':')[0]):012d}.jpg"
    drafted = transform.image_uint8(decode_image(path.read_bytes(), draft_size=transform.draft_size))
    np.testing.assert_array_equal(first["image"], drafted)
    full = transform.image_uint8(open_image(path)).astype(float)
    assert np.abs(first["image"].astype(float) - full).mean() < 4.0


def test_collate_pads_normalises_and_unions(prepared_dataset, transform):
    ds = ParquetGRES(str(prepared_dataset), "train", transform, limit=20)
    assert len(ds) == 20
    batches = list(DataLoader(ds, batch_size=8, collate_fn=ds.collate))
    assert [len(b) for b in batches] == [8, 8, 4]
    seen_multi = seen_empty = False
    for j, batch in enumerate(batches):
        items = [ds[i] for i in range(8 * j, min(8 * j + 8, 20))]
        assert batch.images.shape == (len(items), 3, S, S) and batch.images.dtype == torch.float32
        assert batch.input_ids.shape == (len(items), transform.max_tokens)
        for i, item in enumerate(items):
            # Normalised exactly as GRESTransform.image does it for the predictor.
            from PIL import Image

            torch.testing.assert_close(batch.images[i], transform.image(Image.fromarray(item["image"])))
            assert batch.instance_masks[i].shape[0] == item["num_instances"]
            union = item["instance_masks"].any(0) if item["num_instances"] else np.zeros((S, S), bool)
            np.testing.assert_array_equal(batch.union_masks[i].numpy(), union)
            assert bool(batch.no_target[i]) == item["no_target"] and batch.sample_ids[i] == item["sample_id"]
            seen_multi |= item["num_instances"] > 1
            seen_empty |= item["no_target"]
    assert seen_multi and seen_empty
    # The module-level collate (ImageNet mean/std by default) gives the same batch.
    again = collate([ds[i] for i in range(8)])
    torch.testing.assert_close(again.images, batches[0].images)


def test_columns_to_batch_takes_fixed_shape_masks():
    # Ray hands a plain 4-D array when every row of a batch has the same M.
    cols = dict(image=np.zeros((2, 8, 8, 3), np.uint8), input_ids=np.ones((2, 5), np.int64),
                attention_mask=np.ones((2, 5), np.int64), instance_masks=np.ones((2, 1, 8, 8), bool),
                num_instances=np.array([1, 1]), no_target=np.array([False, False]), sample_id=np.array(["a", "b"]))
    batch = columns_to_batch(cols)
    assert batch.union_masks.all() and [m.shape for m in batch.instance_masks] == [(1, 8, 8)] * 2
    cols["num_instances"] = np.array([1, 2])
    with pytest.raises(ValueError, match="num_instances=2"):
        columns_to_batch(cols)


def test_clear_errors(prepared_dataset, transform, tmp_path):
    with pytest.raises(DatasetFormatError, match="no _manifest.json"):
        ParquetGRES(str(tmp_path), "train", transform)
    with pytest.raises(DatasetFormatError, match="no split 'bogus'.*'train'"):
        ParquetGRES(str(prepared_dataset), "bogus", transform)
    copy = tmp_path / "copy"
    shutil.copytree(prepared_dataset, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DatasetFormatError, match="schema version 99"):
        ParquetGRES(str(copy), "train", transform)
    manifest["schema_version"] = 1
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    shard = copy / "train" / manifest["files"]["train"][0]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # a partial copy: the manifest arrived, the shard did not
    with pytest.raises(DatasetFormatError, match=rf"train/{shard.name} has {len(good) // 2} bytes, the manifest says "
                                                 rf"{len(good)}"):
        ParquetGRES(str(copy), "train", transform)
    shard.unlink()
    with pytest.raises(DatasetFormatError, match=rf"train/{shard.name} is missing"):
        read_manifest(str(copy))
    shard.write_bytes(b"PAR1" + b"x" * (len(good) - 4))  # the right size, not Parquet
    with pytest.raises(DatasetFormatError, match="cannot read Parquet"):
        ParquetGRES(str(copy), "train", transform)
