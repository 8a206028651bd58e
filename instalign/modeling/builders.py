"""Builders: the one place a ``ModelConfig`` becomes keyword arguments (DESIGN §6.2–6.3).

``build_model`` reads the dataclass once and assembles ``InstAlign`` from explicitly
parameterised submodules (torchtune's component/model builder split); no ``nn.Module``
sees a config object. ``instalign_paper`` / ``instalign_tiny`` are the two presets
(paper §4.1 and the CPU-fast toy) with optional field overrides, e.g.
``instalign_paper(num_queries=50, decoder="mask2former")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from instalign.config import ModelConfig, paper, tiny
from instalign.modeling.backbone import create_backbone
from instalign.modeling.heads import InstanceAggregation, NoTargetHead, PredictionHeads
from instalign.modeling.model import InstAlign
from instalign.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from instalign.modeling.pot import PhraseObjectBlock, PhraseObjectDecoder
from instalign.modeling.text_encoder import create_text_encoder

#: The pixel decoder hands the POT blocks three scales (strides 32, 16, 8).
NUM_DECODER_LEVELS = 3
#: Table 3 (e): the text step of each block per ``model.decoder`` (see ``pot.py``).
TEXT_ATTENTION = {"pot": "object_text", "rela": "region_language", "mask2former": "none"}


def build_model(model_cfg: ModelConfig) -> InstAlign:
    """Assemble InstAlign from a ``ModelConfig`` (weights loaded here, through the sub-builders).

    Raises:
        BackboneLoadError / TextEncoderLoadError: weights cannot be found (the message says how to fix it).
        ValueError: the backbone's strides are not 4, 8, 16, 32.
    """
    c = model_cfg
    dim = c.hidden_dim
    backbone = create_backbone(
        name=c.backbone.name,
        pretrained=c.backbone.pretrained,
        out_indices=c.backbone.out_indices,
        image_size=c.image_size,
        kwargs=c.backbone.kwargs,
    )
    if backbone.strides != [4, 8, 16, 32]:
        raise ValueError(
            f"model.backbone: {c.backbone.name!r} with out_indices={list(c.backbone.out_indices)} gives strides "
            f"{backbone.strides}; InstAlign needs strides [4, 8, 16, 32] (choose out_indices accordingly)"
        )
    text_encoder = create_text_encoder(
        name=c.text_encoder.name,
        pretrained=c.text_encoder.pretrained,
        hidden_dim=dim,
        max_tokens=c.text_encoder.max_tokens,
        config_overrides=c.text_encoder.config_overrides,
    )
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=backbone.channels,
        hidden_dim=dim,
        mask_dim=dim,
        num_layers=c.pixel_decoder.num_layers,
        num_heads=c.pixel_decoder.num_heads,
        num_points=c.pixel_decoder.num_points,
        ffn_dim=c.pixel_decoder.ffn_dim,
        dropout=c.dropout,
        attention_impl=c.pixel_decoder.attention_impl,
    )
    blocks = [
        PhraseObjectBlock(dim=dim, num_heads=c.num_heads, ffn_dim=c.ffn_dim, dropout=c.dropout, pre_norm=c.pre_norm,
                          text_attention=TEXT_ATTENTION[c.decoder])
        for _ in range(c.num_blocks)
    ]
    decoder = PhraseObjectDecoder(
        blocks=blocks,
        # A decoder without text (mask2former) scores its text-free instances against the sentence.
        heads=PredictionHeads(dim=dim, mask_dim=dim, text_score=c.decoder == "mask2former"),
        dim=dim,
        num_queries=c.num_queries,
        # with K < 3 blocks only the coarsest K scales are read: no unused level embeddings
        num_levels=min(c.num_blocks, NUM_DECODER_LEVELS),
    )
    return InstAlign(
        backbone=backbone,
        text_encoder=text_encoder,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        aggregator=InstanceAggregation(mode=c.aggregation, score_threshold=c.score_threshold),
        no_target_head=NoTargetHead(dim=dim, mode=c.no_target_input),
        image_size=c.image_size,
    )


def _with(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)  # re-runs __post_init__ validation


def instalign_paper(**overrides: Any) -> InstAlign:
    """The paper's model (Swin-B at 480, RoBERTa-base, C=256, N=100, K=9; §4.1).

    Downloads/reads pretrained weights unless overridden, e.g.
    ``backbone=BackboneConfig(pretrained=False)``.
    """
    return build_model(_with(paper().model, overrides))


def instalign_tiny(**overrides: Any) -> InstAlign:
    """The toy-width model of the ``tiny`` preset (128×128, C=32, N=8, K=3; random init, offline)."""
    return build_model(_with(tiny().model, overrides))


__all__ = ["build_model", "instalign_paper", "instalign_tiny"]
