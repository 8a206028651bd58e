"""One dataset as released (``instalign.data.source``), read from a real synthetic release."""

from __future__ import annotations

import dataclasses

import pytest

from instalign.data.readers import read_source
from instalign.data.source import GRESSource, Ref, Sentence


def test_a_read_release_lists_its_splits_and_its_records_point_at_each_other(synthetic_root):
    source = read_source("grefcoco", str(synthetic_root))
    assert isinstance(source, GRESSource) and source.dataset == "grefcoco"
    assert source.splits() == sorted({r.split for r in source.refs}) and len(source.splits()) >= 2
    assert all(ref.image_id in source.images for ref in source.refs)
    assert all(a in source.annotations for ref in source.refs for a in ref.ann_ids)
    assert all(ref.no_target == (not ref.ann_ids) for ref in source.refs)
    assert source.checksums and all(len(d) == 64 for d in source.checksums.values())


def test_records_are_frozen():
    ref = Ref(ref_id=1, image_id=2, split="val", ann_ids=(), sentences=(Sentence(3, "nothing"),), no_target=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.split = "train"


def test_a_read_release_keeps_its_coco_info_block(synthetic_root):
    """The synthetic generator says what it wrote in ``instances.json``'s ``info``; the reader
    keeps it (``prepare`` records it, and MLflow names a synthetic dataset by it)."""
    from instalign.data.synthetic import SYNTHETIC_DESCRIPTION_PREFIX

    source = read_source("grefcoco", str(synthetic_root))
    assert source.info == {"description": f"{SYNTHETIC_DESCRIPTION_PREFIX} gRefCOCO", "seed": 0, "num_images": 24}
    assert source.info["description"] == "InstAlign synthetic gRefCOCO"  # the generator's bytes are unchanged
