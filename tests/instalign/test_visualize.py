"""Overlays: original size plus a title strip, tint, outlines and labels where they belong."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instalign.predictor import InstancePrediction, Prediction
from instalign.visualize import MERGED_TINT, PALETTE, outline, overlay, save_overlay

H, W = 90, 151


def _scene() -> tuple[Image.Image, Prediction]:
    pixels = np.full((H, W, 3), 200, np.uint8)
    a = np.zeros((H, W), bool)
    a[40:80, 10:50] = True
    b = np.zeros((H, W), bool)
    b[30:70, 90:140] = True
    instances = [InstancePrediction(index=3, score=0.91, mask=a, words=[("red", 0.41), ("left", 0.22), ("the", 0.1)]),
                 InstancePrediction(index=5, score=0.77, mask=b, words=[("red", 0.35), ("square", 0.2)])]
    merged = a | b
    pred = Prediction(mask=merged, no_target=False, no_target_prob=0.12, instances=instances,
                      mask_prob=merged.astype(np.float32), words=["the", "red", "squares"])
    return Image.fromarray(pixels), pred


def test_outline_is_the_boundary_band():
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    ring = outline(m, 1)
    assert ring.sum() == 6 * 4 - 4  # the 6×6 square's border pixels
    assert not ring[3:7, 3:7].any() and ring[2, 2:8].all()
    assert outline(m, 2).sum() == 36 - 4  # two pixels thick
    full = np.ones((4, 4), bool)
    assert outline(full, 1).sum() == 12  # the image border counts as boundary


def test_overlay_size_title_and_colours():
    image, pred = _scene()
    out = overlay(image, pred, "the red squares")
    assert out.mode == "RGB" and out.width == W and out.height > H
    strip = out.height - H
    arr = np.asarray(out)
    body = arr[strip:]
    assert body.shape == (H, W, 3)
    # The title strip is dark with light text in it.
    assert arr[:strip].mean() < 100 and arr[:strip].max() > 200
    # Merged pixels are tinted toward MERGED_TINT; others keep the image's colour.
    inside, outside = body[60, 30], body[10, 70]
    assert tuple(outside) == (200, 200, 200)
    assert inside[2] > inside[0]  # blue tint over grey
    # Each instance is outlined in its own palette colour (bottom edge: no label there).
    assert tuple(body[79, 30]) == PALETTE[0] and tuple(body[69, 115]) == PALETTE[1]
    assert PALETTE[0] != PALETTE[1] and MERGED_TINT not in PALETTE


def test_no_target_is_announced():
    image, pred = _scene()
    nothing = Prediction(mask=np.zeros((H, W), bool), no_target=True, no_target_prob=0.93, instances=[])
    a, b = overlay(image, nothing, "the purple star"), overlay(image, pred, "the purple star")
    arr = np.asarray(a)
    strip = a.height - H
    assert np.array_equal(arr[strip:], np.asarray(image))  # nothing drawn on the image
    # The status line is drawn in the no-target red, which a targeted answer does not use.
    reds = lambda x: ((x[..., 0] > 200) & (x[..., 1] < 150) & (x[..., 2] < 150)).sum()  # noqa: E731
    assert reds(np.asarray(a)[:strip]) > 0 and reds(np.asarray(b)[:b.height - H]) == 0


def test_long_expressions_wrap_and_inputs_match(tmp_path):
    image, pred = _scene()
    short = overlay(image, pred, "red")
    long = overlay(image, pred, " ".join(["the red square next to the other red square"] * 4))
    assert long.width == W and long.height > short.height
    path = save_overlay(np.asarray(image), pred, "the red squares", tmp_path / "sub" / "overlay.png")
    again = Image.open(path)
    assert again.size == short.size and again.mode == "RGB"
    with pytest.raises(ValueError, match="prediction mask"):
        overlay(image.resize((W + 1, H)), pred, "x")


@pytest.mark.parametrize("size, anchor", [((64, 48), (60, 2)), ((200, 150), (190, 140)), ((30, 20), (0, 0))])
def test_a_label_stays_whole_inside_the_image(size, anchor):
    """A label at the right or bottom edge, or wider than the image, is moved in and wrapped."""
    from PIL import ImageDraw

    from instalign.visualize import _font, label_box

    draw = ImageDraw.Draw(Image.new("RGB", size))
    font = _font(10)
    text = "0.93 elephant(0.41) purple(0.33) the(0.12)"
    lines, (x, y, tw, th) = label_box(draw, text, font, anchor=anchor, size=size)
    w, h = size
    assert 0 <= x and x + tw <= w, (x, tw, w)
    assert 0 <= y and (y + th <= h or len(lines) * sum(font.getmetrics()) + 4 > h)  # taller than the image: from the top
    assert all(draw.textlength(line, font=font) <= w - 4 for line in lines)
    shown = " ".join(lines)
    if "\u2026" not in shown:
        assert shown == text  # nothing lost unless a word is wider than the image itself
