"""A second synthetic GRES style, held out: the check that a recipe carries to data it was not shaped on.

Why: the ``tiny`` preset's defaults are chosen on the quickstart's synthetic set
(``instalign.data.synthetic``). A recipe that only works there is a tuned demo. This style
differs from that set in everything that matters to a GRES model, and nothing is ever tuned
on it: it is only *reported* on (docs/objective.md, the held-out table; docs/data.md).

What differs from the quickstart's set:

* **vocabulary** — other shapes (star, diamond, cross, hexagon, ring), other colours
  (purple, orange, cyan, pink, black) and a texture attribute (``striped`` / ``plain``):
  no word of an expression's content is shared with the quickstart's;
* **relations** — superlatives (``the largest star``, ``the smallest purple shape``),
  extremes (``the leftmost ring``, ``the topmost cross``) and relations to another object
  (``the stars left of the pink ring``, ``the diamond above the black hexagon``), whose
  targets may be one object, several, or none;
* **more objects** — 3–7 per image, some overlapping;
* **other images** — 160–448 pixels a side, a shaded background with noise;
* **another no-target rate** — about 28 % of the expressions, hard negatives included: a
  relation that holds for no object (``the stars right of the cyan ring`` when every star
  is left of it), an attribute that no object of that kind has (``the striped hexagon``),
  and combinations absent from the image.

It writes the same release layout and quirks as the quickstart's set (the shared
``Release`` writer). Seeds are drawn from a stream of their own (``_STREAM``), so no seed of
this style repeats a picture of the other. Every target set is right by construction: an
expression comes from a filter over the image's objects, and its targets are exactly what
the filter selects.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils

from instalign.data.masks import rle_decode
from instalign.data.synthetic import (MIN_VISIBLE, SYNTHETIC_DESCRIPTION_PREFIX, Release, SceneObject, check_sizes,
                                      image_size, visible_parts)

__all__ = ["generate_objects", "OBJECT_COLOURS", "OBJECT_SHAPES", "STYLE"]

#: The name of this style (``instalign synthetic --style objects``).
STYLE = "objects"
OBJECT_COLOURS = {"purple": (130, 50, 170), "orange": (240, 130, 20), "cyan": (30, 190, 200),
                  "pink": (240, 120, 180), "black": (25, 25, 25)}
OBJECT_SHAPES = ("star", "diamond", "cross", "hexagon", "ring")
_IMAGE_ID0 = 500_000  # other image ids than the quickstart's set
_STREAM = 0x0B7EC75  # mixed into every seed: pictures of their own, whatever the seed
_SPLIT_CYCLE = ("train", "val", "train", "testA", "train", "testB", "train", "train", "train", "val")
_MAX_POSITIVE_REFS = 5  # per image, so that a few simple expressions do not swamp the relations
_NO_TARGET_P = 0.3  # no-target refs ~ Binomial(positive refs, 0.3): ~25-30 % of the expressions


@dataclass
class _Thing(SceneObject):
    striped: bool = False

    @property
    def texture(self) -> str:
        return "striped" if self.striped else "plain"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    if shape == "star":  # five points, inner radius 0.45 r
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([cx + radii * np.cos(angles), cy - radii * np.sin(angles)], 1)
    elif shape == "diamond":
        pts = np.array([[cx, cy - r], [cx + 0.7 * r, cy], [cx, cy + r], [cx - 0.7 * r, cy]])
    elif shape == "cross":
        a = 0.33 * r
        pts = np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a],
                        [-r, -a], [-a, -a]]) + [cx, cy]
    else:  # hexagon
        angles = np.arange(6) * np.pi / 3
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
    return [round(float(v), 2) for v in pts.ravel()]


def _rasterise(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> tuple[np.ndarray, list[float] | None]:
    if shape == "ring":  # an annulus: no polygon can say it, so it is released as RLE
        yy, xx = np.ogrid[:h, :w]
        d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2), None
    poly = _polygon(shape, cx, cy, r)
    return rle_decode(mask_utils.frPyObjects([poly], h, w)[0]["counts"], h, w), poly


def _place(rng: np.random.Generator, h: int, w: int, next_ann: int) -> list[_Thing]:
    things: list[_Thing] = []
    for _ in range(int(rng.integers(3, 8))):
        shape = OBJECT_SHAPES[rng.integers(len(OBJECT_SHAPES))]
        colour = list(OBJECT_COLOURS)[rng.integers(len(OBJECT_COLOURS))]
        r = min(h, w) * rng.uniform(0.06, 0.16)
        striped, overlap_ok = bool(rng.random() < 0.35), bool(rng.random() < 0.25)
        for _attempt in range(30):
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if not overlap_ok and any(abs(cx - o.cx) < r + o.r + 2 and abs(cy - o.cy) < r + o.r + 2 for o in things):
                continue
            full, poly = _rasterise(shape, cx, cy, r, h, w)
            if not full.any():
                continue
            cand = things + [_Thing(next_ann + len(things), shape, colour, "", cx, cy, r, full, poly, striped)]
            if overlap_ok and any(v.sum() < MIN_VISIBLE * o.full.sum() for o, v in zip(cand, visible_parts(cand))):
                continue
            things = cand
            break
    return things


def _paint(rng: np.random.Generator, h: int, w: int, things: list[_Thing]) -> np.ndarray:
    """A shaded, noisy background; each object in its colour, stripes darker."""
    top, bottom = rng.integers(150, 235, size=3), rng.integers(150, 235, size=3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    pixels = (1 - t) * top + t * bottom + rng.normal(0, 6, size=(h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    for o in things:
        colour = np.array(OBJECT_COLOURS[o.colour], dtype=float) + rng.integers(-15, 16, size=3)
        pixels[o.full] = colour
        if o.striped:
            stripes = o.full & (((xx + yy) // max(2, int(o.r / 3))) % 2 == 0)
            pixels[stripes] = colour * 0.45
    return np.clip(pixels, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- expressions
def _name(shape: str | None = None, colour: str | None = None, texture: str | None = None, plural: bool = False) -> str:
    noun = shape or "shape"
    if plural:
        noun += "es" if noun.endswith("s") else "s"
    return " ".join(x for x in (texture, colour, noun) if x)


#: A filter over objects: (words, predicate), e.g. ("purple star", lambda o: ...).
Filter = tuple[str, Callable[[_Thing], bool]]


def _filters(things: list[_Thing]) -> list[tuple[dict, Filter]]:
    """Attribute filters present in the image (shape; colour; colour + shape; texture + shape)."""
    out: list[tuple[dict, Filter]] = []
    for shape in sorted({o.shape for o in things}):
        out.append(({"shape": shape}, (shape, lambda o, s=shape: o.shape == s)))
    for colour in sorted({o.colour for o in things}):
        out.append(({"colour": colour}, (colour, lambda o, c=colour: o.colour == c)))
    for colour, shape in sorted({(o.colour, o.shape) for o in things}):
        out.append(({"colour": colour, "shape": shape},
                    (f"{colour} {shape}", lambda o, c=colour, s=shape: o.colour == c and o.shape == s)))
    for texture, shape in sorted({(o.texture, o.shape) for o in things}):
        out.append(({"texture": texture, "shape": shape},
                    (f"{texture} {shape}", lambda o, t=texture, s=shape: o.texture == t and o.shape == s)))
    return out


def _phrases(kind: dict, plural: bool) -> str:
    return _name(kind.get("shape"), kind.get("colour"), kind.get("texture"), plural=plural)


def _positive(things: list[_Thing], w: int, h: int) -> list[tuple[list[_Thing], list[str]]]:
    """(targets, phrases) whose targets are exactly what the words select."""
    out: list[tuple[list[_Thing], list[str]]] = []
    filters = _filters(things)
    for kind, (_, keep) in filters:
        group = [o for o in things if keep(o)]
        if len(group) == 1:
            out.append((group, [f"the {_phrases(kind, False)}"]))
        elif len(group) >= 2:
            words = _phrases(kind, True)
            out.append((group, [f"all {words}", f"the {words}"] + (["both " + words] if len(group) == 2 else [])))
            # superlatives and extremes within the group, when they are clear (15 % apart)
            by_size = sorted(group, key=lambda o: o.r)
            if by_size[-1].r > 1.15 * by_size[-2].r:
                out.append(([by_size[-1]], [f"the largest {_phrases(kind, False)}", f"the biggest {_phrases(kind, False)}"]))
            if by_size[1].r > 1.15 * by_size[0].r:
                out.append(([by_size[0]], [f"the smallest {_phrases(kind, False)}"]))
            by_x = sorted(group, key=lambda o: o.cx)
            if by_x[1].cx - by_x[0].cx > 0.08 * w:
                out.append(([by_x[0]], [f"the leftmost {_phrases(kind, False)}"]))
            if by_x[-1].cx - by_x[-2].cx > 0.08 * w:
                out.append(([by_x[-1]], [f"the rightmost {_phrases(kind, False)}"]))
            by_y = sorted(group, key=lambda o: o.cy)
            if by_y[1].cy - by_y[0].cy > 0.08 * h:
                out.append(([by_y[0]], [f"the topmost {_phrases(kind, False)}"]))
    return out


def _relations(rng: np.random.Generator, things: list[_Thing], w: int, h: int) -> list[tuple[list[_Thing], list[str]]]:
    """``the <shape>s left of / right of / above / below the <unique anchor>``: any number of targets."""
    keys = {}
    for o in things:
        keys.setdefault((o.colour, o.shape), []).append(o)
    anchors = [g[0] for g in keys.values() if len(g) == 1]
    out = []
    relations = {"left of": lambda o, a: o.cx < a.cx - 0.05 * w, "right of": lambda o, a: o.cx > a.cx + 0.05 * w,
                 "above": lambda o, a: o.cy < a.cy - 0.05 * h, "below": lambda o, a: o.cy > a.cy + 0.05 * h}
    shapes = sorted(set(OBJECT_SHAPES))
    for anchor in anchors:
        shape = shapes[rng.integers(len(shapes))]
        rel = list(relations)[rng.integers(len(relations))]
        candidates = [o for o in things if o.shape == shape and o is not anchor]
        if not candidates:
            continue  # "the stars left of ..." with no star at all is the absent-kind negative below
        targets = [o for o in candidates if relations[rel](o, anchor)]
        anchor_words = f"the {anchor.colour} {anchor.shape}"
        plural = _name(shape, plural=True)
        phrases = [f"the {plural} {rel} {anchor_words}", f"all {plural} {rel} {anchor_words}"]
        if len(targets) == 1:
            phrases.append(f"the {shape} {rel} {anchor_words}")
        out.append((targets, phrases))  # no target when the relation holds for none
    return out


def _absent(rng: np.random.Generator, things: list[_Thing]) -> list[str]:
    """Expressions of things not in the image: an absent combination or texture."""
    present = {(o.colour, o.shape) for o in things}
    absent = [(c, s) for c in OBJECT_COLOURS for s in OBJECT_SHAPES if (c, s) not in present]
    colour, shape = absent[rng.integers(len(absent))]
    out = [f"the {colour} {shape}", f"{colour} {shape}"]
    if not any(o.shape == shape for o in things):
        out.append(f"all {_name(shape, plural=True)}")
    textures = {(o.texture, o.shape) for o in things}
    for o in things:
        other = "plain" if o.striped else "striped"
        if (other, o.shape) not in textures:
            out[1] = f"the {other} {o.shape}"
            break
    return out


def generate_objects(root: str | os.PathLike[str], num_images: int = 200, seed: int = 0, *,
                     min_size: int = 160, max_size: int = 448, jpeg_quality: int = 90) -> dict[str, dict[str, int]]:
    """Write the held-out ``objects`` style under ``root``; deterministic in ``(num_images, seed)``.

    Same return value as ``generate_grefcoco``: per-split counts of images, refs, samples,
    no-target and multi-target samples.
    """
    check_sizes(num_images, min_size, max_size)
    release = Release(root, description=f"{SYNTHETIC_DESCRIPTION_PREFIX} GRES, held-out 'objects' style", seed=seed,
                      num_images=num_images, categories=OBJECT_SHAPES)
    for i in range(num_images):
        rng = np.random.default_rng([_STREAM, seed, i])
        w, h = image_size(rng, min_size, max_size)
        image_id, split = _IMAGE_ID0 + i, _SPLIT_CYCLE[i % len(_SPLIT_CYCLE)]
        things = _place(rng, h, w, release.next_ann)
        release.next_ann += len(things)
        release.add_image(image_id, split, _paint(rng, h, w, things), things, jpeg_quality=jpeg_quality)

        candidates = _positive(things, w, h) + _relations(rng, things, w, h)
        positive = [c for c in candidates if c[0]]
        negative = [c for c in candidates if not c[0]]
        chosen = [positive[j] for j in sorted(rng.permutation(len(positive))[:_MAX_POSITIVE_REFS])]
        n_negative = int(rng.binomial(len(chosen), _NO_TARGET_P))
        # a relation that holds for no object first (the hardest negative), then absent things
        negatives = [phrases for _, phrases in negative[:1]] + [_absent(rng, things) for _ in range(n_negative)]
        specs = [(targets, phrases, True) for targets, phrases in chosen]
        specs += [([], phrases, True) for phrases in negatives[:n_negative]]
        if i % 9 == 4 and specs and specs[0][0]:  # the release has a few refs without sentences
            specs.append((specs[0][0], specs[0][1], False))
        release.add_refs(rng, image_id, split, specs)
    return release.write("object")

