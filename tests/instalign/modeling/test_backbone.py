"""The image backbone (``instalign.modeling.backbone``): timm models as four NCHW feature maps, the
paper's Swin-B ImageNet-22k weights, local weight files, and one clear error per way loading fails."""

from __future__ import annotations

import pytest
import torch

from instalign.modeling import BackboneLoadError
from instalign.modeling.backbone import create_backbone


def test_paper_backbone_is_the_imagenet22k_swin_b(monkeypatch):
    """The paper (like Mask2Former and ReLA) starts from Swin-B's ImageNet-22k weights.

    Resolved without downloading: timm's pretrained config for the preset's name, and the
    name ``create_backbone`` hands to ``timm.create_model`` unchanged.
    """
    import timm
    from timm.models import get_pretrained_cfg

    from instalign.config import paper

    name = paper().model.backbone.name
    assert name == "swin_base_patch4_window12_384.ms_in22k"
    cfg = get_pretrained_cfg(name)
    assert cfg.tag == "ms_in22k" and cfg.hf_hub_id == "timm/swin_base_patch4_window12_384.ms_in22k"
    assert cfg.num_classes == 21841  # the 22k head, not the ImageNet-1k fine-tune
    assert get_pretrained_cfg("swin_base_patch4_window12_384").tag == "ms_in22k_ft_in1k"  # what no tag gives

    calls = []

    def fake_create_model(model_name, **kwargs):
        calls.append((model_name, kwargs))
        raise RuntimeError("stop here: nothing is downloaded")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    with pytest.raises(BackboneLoadError):
        create_backbone(name=name, pretrained=True, out_indices=(0, 1, 2, 3), image_size=480)
    assert calls[0][0] == name and calls[0][1]["pretrained"] is True


def test_backbone_formats_local_weights_and_errors(tmp_path):
    from safetensors.torch import save_file

    swin = create_backbone(name="swin_tiny_patch4_window7_224", pretrained=False, out_indices=(0, 1, 2, 3),
                           image_size=64, kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                                      window_size=4))
    cnn = create_backbone(name="resnet18", pretrained=False, out_indices=(1, 2, 3, 4), image_size=64)
    assert swin.channels_last and not cnn.channels_last
    x = torch.randn(1, 3, 64, 64)
    for bb in (swin, cnn):
        assert bb.strides == [4, 8, 16, 32]
        for f, c, s in zip(bb(x), bb.channels, bb.strides):
            assert f.shape == (1, c, 64 // s, 64 // s)  # NCHW whatever timm returned
    # a local weights file (timm's pretrained_cfg_overlay) is loaded for real
    import timm

    ref = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(ref.state_dict(), str(path))
    loaded = create_backbone(name="resnet18", pretrained=str(path), out_indices=(1, 2, 3, 4), image_size=64)
    torch.testing.assert_close(loaded.body.conv1.weight, ref.conv1.weight)
    with pytest.raises(BackboneLoadError, match="no such weights file"):
        create_backbone(name="resnet18", pretrained=str(tmp_path / "missing.pth"), out_indices=(1, 2, 3, 4),
                        image_size=64)
    with pytest.raises(BackboneLoadError, match="model.backbone.pretrained"):  # HF_HUB_OFFLINE=1 (conftest)
        create_backbone(name="resnet18", pretrained=True, out_indices=(1, 2, 3, 4), image_size=64)
    with pytest.raises(BackboneLoadError, match="not a timm model"):
        create_backbone(name="no_such_net", pretrained=False, out_indices=(0, 1, 2, 3), image_size=64)


@pytest.mark.slow
def test_paper_backbone_runs_at_480():
    """Swin-B (random init) at the paper's 480×480 — ~15 s on 2 CPU cores, so marked slow."""
    bb = create_backbone(name="swin_base_patch4_window12_384", pretrained=False, out_indices=(0, 1, 2, 3),
                         image_size=480)
    assert bb.channels == [128, 256, 512, 1024] and bb.strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 480, 480))
    assert [tuple(f.shape[-2:]) for f in feats] == [(120, 120), (60, 60), (30, 30), (15, 15)]
