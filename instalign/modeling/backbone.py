"""Visual encoder (paper §3.1): any timm model through its feature API.

The paper uses Swin-B (``swin_base_patch4_window12_384``, ImageNet-22k) at 480×480 and
takes its four stages (strides 4, 8, 16, 32). ``timm.create_model(..., features_only=True)``
gives the multi-scale maps; channels and strides are read from ``feature_info`` so the
pixel decoder is sized by whatever backbone the config names (DESIGN §6.4). timm's Swin
returns channels-last (NHWC) maps in this mode while CNNs return NCHW: the wrapper reads
the model's ``output_fmt`` and always hands NCHW to the pixel decoder.

Only ``create_backbone`` touches weights files or the hub; ``Backbone`` takes the built
timm model (injected submodule, no config object).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

from torch import Tensor, nn

from instalign.errors import InstAlignError


class BackboneLoadError(InstAlignError, RuntimeError):
    """The backbone could not be created or its weights could not be loaded."""


class Backbone(nn.Module):
    """Multi-scale visual features in NCHW.

    Args:
        body: a timm ``features_only`` model returning one map per selected stage.
        channels: channels of each returned map.
        strides: stride (reduction) of each returned map w.r.t. the input.
        channels_last: whether ``body`` returns NHWC maps (timm's Swin / ViT-style models).
    """

    def __init__(self, *, body: nn.Module, channels: Sequence[int], strides: Sequence[int], channels_last: bool) -> None:
        super().__init__()
        self.body = body
        self.channels = list(channels)
        self.strides = list(strides)
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> list[Tensor]:
        """Args: images (B, 3, H, W). Returns: maps (B, C_l, H/s_l, W/s_l), strides ascending."""
        feats = self.body(images)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]  # (B, H, W, C) -> (B, C, H, W)
        return list(feats)


def _hint(name: str) -> str:
    return (
        f"Point model.backbone.pretrained at a local weights file for {name!r} (.safetensors, .pth or .bin, "
        "e.g. model.backbone.pretrained=/path/to/model.safetensors), make the Hugging Face cache hold it "
        "(unset HF_HUB_OFFLINE on a machine with internet once), or set model.backbone.pretrained=false "
        "for a random init."
    )


def create_backbone(
    *,
    name: str,
    pretrained: Union[bool, str],
    out_indices: Sequence[int],
    image_size: int,
    kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Build the timm feature extractor and wrap it.

    Args:
        name: a timm model name.
        pretrained: True for timm's hub weights, a path for a local weights file, False for random init.
        out_indices: the four stages to return (strides 4, 8, 16, 32 for the paper).
        image_size: input side; passed as ``img_size`` to models that take it (Swin needs it to
            run at 480 with 384-trained windows) unless ``kwargs`` already sets it.
        kwargs: extra ``timm.create_model`` arguments.

    Raises:
        BackboneLoadError: unknown model, missing local file, or hub weights unreachable.
    """
    import timm  # here, not at import: importing instalign.modeling stays light (timm takes seconds)

    kwargs = dict(kwargs or {})
    if not timm.is_model(name):
        raise BackboneLoadError(f"model.backbone.name={name!r} is not a timm model (see timm.list_models()).")
    load: dict[str, Any] = {}
    if isinstance(pretrained, str):
        path = Path(os.path.expanduser(pretrained))
        if not path.is_file():
            raise BackboneLoadError(f"model.backbone.pretrained={pretrained!r}: no such weights file. " + _hint(name))
        load = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    else:
        load = dict(pretrained=bool(pretrained))
    common = dict(features_only=True, out_indices=tuple(out_indices), **load)
    try:
        try:
            body = timm.create_model(name, **common, **{"img_size": image_size, **kwargs})
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in kwargs:
                raise
            body = timm.create_model(name, **common, **kwargs)  # a model without an input size (CNNs)
    except (OSError, RuntimeError) as e:
        # OSError: the hub is offline/unreachable or the file is unreadable; RuntimeError: a
        # state dict that does not fit the architecture.
        what = f"local file {pretrained!r}" if isinstance(pretrained, str) else "hub weights"
        raise BackboneLoadError(f"model.backbone: could not load {what} for {name!r}: {e}. " + _hint(name)) from e
    info = body.feature_info
    fmt = str(getattr(body, "output_fmt", "NCHW"))
    return Backbone(
        body=body,
        channels=info.channels(),
        strides=info.reduction(),
        channels_last=fmt.endswith("NHWC"),
    )


__all__ = ["Backbone", "BackboneLoadError", "create_backbone"]
