"""Building the model from its config (``instalign.modeling.builders``): the presets' builders, and
the config errors they refuse in one line. That every Table 3 switch builds and trains is in
``test_model.py``."""

from __future__ import annotations

import dataclasses

import pytest

from instalign.config import BackboneConfig, tiny
from instalign.modeling import InstAlign, build_model, instalign_tiny


def test_the_tiny_builder_takes_model_config_fields():
    model = instalign_tiny(num_queries=3, num_blocks=1)
    assert isinstance(model, InstAlign) and model.image_size == 128
    assert model.decoder.query_feat.num_embeddings == 3 and len(model.decoder.blocks) == 1
    with pytest.raises(TypeError, match=r"unknown ModelConfig field\(s\) \['num_querys'\]"):
        instalign_tiny(num_querys=3)


def test_a_backbone_with_the_wrong_strides_is_refused_naming_its_out_indices():
    cfg = dataclasses.replace(tiny().model, image_size=64,
                              backbone=BackboneConfig(name="resnet18", pretrained=False, out_indices=(0, 1, 2, 3)))
    with pytest.raises(ValueError, match=r"'resnet18' with out_indices=\[0, 1, 2, 3\] gives strides .* needs strides "
                                         r"\[4, 8, 16, 32\]"):
        build_model(cfg)
