"""Overlays for people: what InstAlign segmented and why (paper §3.5 instances, Fig. 1 style).

One picture per (image, expression): the merged mask (eq. 8) tinted over the image; each
instance the aggregation kept outlined in its own colour and labelled with its relevance
p̂ and the words its Phrase-Object Alignment row R_K^i (eq. 1) weighs most; the expression
in a title strip above the image, with the no-target decision (eq. 12). The image area
keeps the original size, so overlays line up with the input; the strip adds height only.

PIL only (``ImageDraw``); an instance's outline is its mask minus the mask eroded in numpy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from instalign.predictor import ImageInput, Prediction, load_image

__all__ = ["overlay", "save_overlay", "outline", "PALETTE", "MERGED_TINT"]

#: The merged mask's tint (a blue no instance colour below repeats).
MERGED_TINT = (30, 144, 255)
#: Distinct instance colours (Trubetskoy's 20-colour list, blues removed).
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (245, 130, 48), (145, 30, 180), (240, 50, 230),
           (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0), (170, 255, 195),
           (128, 128, 0), (255, 215, 180), (70, 240, 240)]
_STRIP_BG = (32, 32, 32)
_NO_TARGET = (255, 96, 96)


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """``mask`` minus its erosion by a ``thickness``-pixel cross: the boundary band, (h, w) bool.

    Pixels on the image border count as boundary (the padding is background).
    """
    mask = np.asarray(mask, dtype=bool)
    eroded = mask
    for _ in range(max(1, int(thickness))):
        p = np.pad(eroded, 1, constant_values=False)
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError):  # pragma: no cover - very old Pillow / no FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _fit(draw: ImageDraw.ImageDraw, word: str, font: ImageFont.ImageFont, width: int) -> str:
    """``word`` cut to ``width`` pixels with an ellipsis (a word wider than the whole image)."""
    if draw.textlength(word, font=font) <= width:
        return word
    while len(word) > 1 and draw.textlength(word + "\u2026", font=font) > width:
        word = word[:-1]
    return word + "\u2026"


def label_box(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, *, anchor: tuple[int, int],
              size: tuple[int, int]) -> tuple[list[str], tuple[int, int, int, int]]:
    """Where an instance's label goes: its lines and box ``(x, y, width, height)``, inside the image.

    The label sits above the instance's top-left corner (``anchor``), moved in to stay whole
    at the image's edges; a label wider than the image is wrapped onto lines (and a single
    word wider than it cut with an ellipsis) instead of running off the edge.
    """
    w, h = size
    lines = [_fit(draw, line, font, max(w - 4, 1)) for line in _wrap(draw, text, font, max(w - 4, 1))]
    tw = int(max(draw.textlength(line, font=font) for line in lines)) + 4
    th = sum(font.getmetrics()) * len(lines) + 4
    x = int(np.clip(anchor[0], 0, max(w - tw, 0)))
    y = int(np.clip(anchor[1] - th, 0, max(h - th, 0)))
    return lines, (x, y, tw, th)


def _label(score: float, words: list[tuple[str, float]], top_words: int) -> str:
    said = " ".join(f"{w}({weight:.2f})" for w, weight in words[:top_words])
    return f"{score:.2f} {said}".strip()


def overlay(image: ImageInput, prediction: Prediction, expression: str, *, alpha: float = 0.45,
            top_words: int = 2, show_instances: bool = True) -> Image.Image:
    """Draw ``prediction`` over ``image`` for a human reader.

    Args:
        image: the original image (anything ``Predictor.predict`` accepts).
        prediction: ``Predictor.predict``'s answer for this image (masks at its size).
        expression: the referring expression, shown in the title strip.
        alpha: opacity of the merged-mask tint.
        top_words: words shown per instance label.
        show_instances: outline and label the kept instances.

    Returns:
        An RGB image ``w`` wide and ``h + strip`` high: the title strip on top, then the
        image at its original size.
    """
    base = load_image(image)
    w, h = base.size
    if prediction.mask.shape != (h, w):
        raise ValueError(f"overlay: prediction mask is {prediction.mask.shape} but the image is (h={h}, w={w}); "
                         "pass the image the prediction was made on")
    pixels = np.asarray(base, dtype=np.float32)  # (h, w, 3)
    merged = np.asarray(prediction.mask, dtype=bool)
    pixels[merged] = (1 - alpha) * pixels[merged] + alpha * np.asarray(MERGED_TINT, dtype=np.float32)
    thickness = max(1, round(min(h, w) / 160))
    instances = prediction.instances if show_instances else []
    for k, inst in enumerate(instances):
        pixels[outline(inst.mask, thickness)] = PALETTE[k % len(PALETTE)]
    canvas_img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    font_size = int(np.clip(round(w / 32), 10, 28))
    font = _font(font_size)
    draw = ImageDraw.Draw(canvas_img)
    for k, inst in enumerate(instances):
        ys, xs = np.nonzero(inst.mask)
        if not len(xs):
            continue
        lines, (x, y, tw, th) = label_box(draw, _label(inst.score, inst.words, top_words), font,
                                          anchor=(int(xs.min()), int(ys.min())), size=(w, h))
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle([x, y, x + tw, y + th], fill=colour)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        line_h = sum(font.getmetrics())
        for i, line in enumerate(lines):
            draw.text((x + 2, y + 2 + i * line_h), line, font=font, fill=ink)

    # Title strip: the expression, then the decision.
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(2, font_size // 3)
    lines = _wrap(probe, f"\u201c{expression}\u201d", font, w - 2 * pad)
    if prediction.no_target:
        status, status_colour = f"no target (p={prediction.no_target_prob:.2f})", _NO_TARGET
    else:
        n = len(prediction.instances)
        status = f"target (p_nt={prediction.no_target_prob:.2f}), {n} instance{'s' if n != 1 else ''}"
        status_colour = (200, 200, 200)
    status_lines = _wrap(probe, status, font, w - 2 * pad)
    line_h = sum(font.getmetrics()) + 2
    strip_h = pad * 2 + line_h * (len(lines) + len(status_lines))
    out = Image.new("RGB", (w, h + strip_h), _STRIP_BG)
    out.paste(canvas_img, (0, strip_h))
    draw = ImageDraw.Draw(out)
    y = pad
    for line in lines:
        draw.text((pad, y), line, font=font, fill=(255, 255, 255))
        y += line_h
    for line in status_lines:
        draw.text((pad, y), line, font=font, fill=status_colour)
        y += line_h
    return out


def save_overlay(image: ImageInput, prediction: Prediction, expression: str, path: Union[str, os.PathLike],
                 **kwargs) -> Path:
    """:func:`overlay`, written to ``path`` (format from the extension, PNG recommended)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, prediction, expression, **kwargs).save(path)
    return path
