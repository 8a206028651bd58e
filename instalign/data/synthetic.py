"""A synthetic gRefCOCO: simple shapes written in the exact on-disk release format (DESIGN §3).

Why: tests, the quickstart and smoke trainings need a dataset that exercises every part of
the pipeline — readers, prepare, loaders, the model's single-, multi- and no-target paths —
without downloading COCO. So the generator writes what ReLA's release looks like::

    <root>/grefcoco/grefs(unc).json       list of refs (ann_id int | list | [-1], no_target, ...)
    <root>/grefcoco/instances.json        COCO images / annotations / categories
    <root>/images/train2014/COCO_train2014_%012d.jpg

Images hold 1–4 circles, squares and triangles (4 colours, 2 size classes) on a plain
background, of varied non-square sizes; some overlap. Every target set is right *by
construction*: an expression is generated from an attribute filter (colour, shape, size,
side) and its targets are exactly the objects the filter selects; an occluded object's mask
is what remains visible, and the picture is painted from those same masks.

Release quirks reproduced (so the readers and prepare meet them here first): single-target
``ann_id`` as an int for some refs and a one-element list for others, ``[-1]`` for no
target, ``file_name`` with a RefCOCO-style suffix (not an image file), a few refs with no
sentences, polygons for unoccluded squares/triangles, RLE for circles (compressed and
uncompressed ``counts`` alternating) and for occluded shapes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from instalign.data.masks import counts_to_runs, rle_decode, rle_encode

__all__ = ["generate_grefcoco", "COLOURS", "SHAPES", "SPLITS", "Release", "SceneObject", "visible_parts", "MIN_VISIBLE",
           "SYNTHETIC_DESCRIPTION_PREFIX"]

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 75, 215), "yellow": (230, 195, 35)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.08, 0.12), "big": (0.17, 0.23)}  # half-extent as a fraction of min(w, h)
SPLITS = ("train", "val", "testA", "testB")
_SPLIT_CYCLE = ("train", "val", "train", "testA", "train", "testB", "train", "train", "train", "train")
_IMAGE_ID0 = 100_000
MIN_VISIBLE = 0.5  # an occluded object keeps at least half of its area visible
#: How every synthetic style's ``instances.json`` ``info.description`` begins: ``prepare`` keeps
#: that block in the manifest (``source_info``) and MLflow's dataset input is then named
#: ``synthetic-<dataset>`` (``pipelines.data.lineage``), never as if it were the real release.
SYNTHETIC_DESCRIPTION_PREFIX = "InstAlign synthetic"


@dataclass
class SceneObject:
    ann_id: int
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    full: np.ndarray  # (h, w) bool, the whole shape
    polygon: list[float] | None  # squares and triangles

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)


def _rasterise(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> tuple[np.ndarray, list[float] | None]:
    if shape == "circle":
        yy, xx = np.ogrid[:h, :w]
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r, None
    if shape == "square":
        poly = [cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r]
    else:
        poly = [cx, cy - r, cx + r, cy + r, cx - r, cy + r]
    poly = [round(v, 2) for v in poly]
    # Rasterised by pycocotools itself, so the released polygon decodes to exactly these pixels.
    full = rle_decode(mask_utils.frPyObjects([poly], h, w)[0]["counts"], h, w)
    return full, poly


def _place_objects(rng: np.random.Generator, h: int, w: int, next_ann: int) -> list[SceneObject]:
    objs: list[SceneObject] = []
    for _ in range(int(rng.integers(1, 5))):
        shape, colour = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(4)]
        size = "small" if rng.random() < 0.5 else "big"
        r = min(h, w) * rng.uniform(*SIZES[size])
        overlap_ok = rng.random() < 0.3
        for _attempt in range(30):
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if not overlap_ok and any(abs(cx - o.cx) < r + o.r + 2 and abs(cy - o.cy) < r + o.r + 2 for o in objs):
                continue
            full, poly = _rasterise(shape, cx, cy, r, h, w)
            cand = objs + [SceneObject(next_ann + len(objs), shape, colour, size, cx, cy, r, full, poly)]
            if overlap_ok and any(v.sum() < MIN_VISIBLE * o.full.sum() for o, v in zip(cand, visible_parts(cand))):
                continue  # would hide too much of an earlier object
            objs = cand
            break
    return objs


def visible_parts(objs: list[SceneObject]) -> list[np.ndarray]:
    """What remains of each object under the ones drawn after it (later = on top)."""
    out, above = [], np.zeros_like(objs[0].full)
    for o in reversed(objs):
        out.append(o.full & ~above)
        above |= o.full
    return out[::-1]


def _segmentation(o: SceneObject, vis: np.ndarray, h: int, w: int) -> Any:
    if o.polygon is not None and np.array_equal(vis, o.full):
        return [o.polygon]
    counts = rle_encode(vis)
    if o.polygon is None and o.ann_id % 2:  # uncompressed RLE, as COCO's crowd-style releases
        return {"size": [h, w], "counts": counts_to_runs(counts).tolist()}
    return {"size": [h, w], "counts": counts}


# ---------------------------------------------------------------- expressions
def _phrase(colour: str | None, shape: str | None, size: str | None = None, side: str | None = None) -> str:
    words = ["the"] + [x for x in (size, colour, shape) if x]
    return " ".join(words) + (f" on the {side}" if side else "")


def _single_target(o: SceneObject, objs: list[SceneObject], w: int) -> list[str]:
    """Phrases that select exactly ``o`` (each checked against all objects)."""
    same = lambda **f: [p for p in objs if all(getattr(p, k) == v for k, v in f.items())]  # noqa: E731
    out = []
    if len(same(shape=o.shape)) == 1:
        out.append(_phrase(None, o.shape))
    if len(same(colour=o.colour, shape=o.shape)) == 1:
        out += [_phrase(o.colour, o.shape), f"{o.colour} {o.shape}"]
    elif len(same(size=o.size, colour=o.colour, shape=o.shape)) == 1:
        out.append(_phrase(o.colour, o.shape, o.size))
    if len(same(size=o.size, shape=o.shape)) == 1 and len(same(shape=o.shape)) > 1:
        out.append(_phrase(None, o.shape, o.size))
    twins = same(colour=o.colour, shape=o.shape)
    if len(twins) == 2:
        other = twins[0] if twins[1] is o else twins[1]
        if abs(o.cx - other.cx) > 0.15 * w:
            side = "left" if o.cx < other.cx else "right"
            out.append(_phrase(o.colour, o.shape, side=side))
            if o.size != other.size:
                out.append(_phrase(o.colour, o.shape, o.size, side=side))
    return out


def _multi_target(objs: list[SceneObject]) -> list[tuple[list[SceneObject], list[str]]]:
    out = []
    for shape in SHAPES:
        group = [o for o in objs if o.shape == shape]
        if len(group) >= 2:
            out.append((group, [f"all {shape}s", f"the {shape}s", f"every {shape}"]))
    for colour in COLOURS:
        group = [o for o in objs if o.colour == colour]
        if len(group) >= 2:
            out.append((group, [f"all {colour} shapes", f"the {colour} shapes", f"every {colour} shape"]))
    keys = Counter(o.key for o in objs)
    unique = [o for o in objs if keys[o.key] == 1]
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            pa, pb = _phrase(a.colour, a.shape), _phrase(b.colour, b.shape)
            out.append(([a, b], [f"{pa} and {pb}", f"{pb} and {pa}", f"{pa[4:]} and {pb[4:]}"]))
    if len(objs) >= 2:
        out.append((list(objs), ["all shapes", "all the shapes", "every shape"]))
    return out


def _no_target(rng: np.random.Generator, objs: list[SceneObject]) -> list[str]:
    present = {o.key for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = absent[rng.integers(len(absent))]
    out = [_phrase(colour, shape), f"{colour} {shape}"]
    if not any(o.shape == shape for o in objs):
        out.append(f"all {shape}s")
    if rng.random() < 0.4:  # "the big red circle" when only a small one exists: a hard negative
        o = objs[rng.integers(len(objs))]
        other = "small" if o.size == "big" else "big"
        if not any(p.key == o.key and p.size == other for p in objs):
            out[1] = _phrase(o.colour, o.shape, other)
    return out


def _sentences(rng: np.random.Generator, phrases: list[str], next_sent: int) -> list[dict]:
    k = int(rng.integers(1, min(3, len(phrases)) + 1))
    chosen = [phrases[j] for j in sorted(rng.choice(len(phrases), size=k, replace=False))]
    return [{"tokens": p.split(), "raw": p, "sent": p, "sent_id": next_sent + j} for j, p in enumerate(chosen)]


# ------------------------------------------------------------------- the release
class Release:
    """The on-disk release being written: images, annotations, refs and the per-split counts.

    Shared by every synthetic style (this module's shapes, ``synthetic_objects``), so that
    each writes exactly the layout and quirks described in the module docstring; a style
    decides what is in the pictures and what the expressions say.
    """

    def __init__(self, root: str | os.PathLike[str], *, description: str, seed: int, num_images: int,
                 categories: tuple[str, ...]) -> None:
        self.root = Path(root)
        self.image_dir, self.ann_dir = self.root / "images" / "train2014", self.root / "grefcoco"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.ann_dir.mkdir(parents=True, exist_ok=True)
        self.info = {"description": description, "seed": seed, "num_images": num_images}
        self.categories = categories
        self.counts: dict[str, Counter] = {k: Counter() for k in
                                           ("images", "refs", "samples", "no_target_samples", "multi_target_samples")}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.refs: list[dict] = []
        self.next_ann, self.next_ref, self.next_sent = 1, 0, 0

    def add_image(self, image_id: int, split: str, pixels: np.ndarray, objs: list[SceneObject], *,
                  jpeg_quality: int) -> None:
        """Save the picture and annotate what is visible of each object (later = on top)."""
        h, w = pixels.shape[:2]
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(pixels).save(self.image_dir / file_name, quality=jpeg_quality)
        self.images.append({"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 1})
        for o, v in zip(objs, visible_parts(objs)):
            ys, xs = np.nonzero(v)
            self.annotations.append({
                "id": o.ann_id, "image_id": image_id, "category_id": self.categories.index(o.shape) + 1,
                "segmentation": _segmentation(o, v, h, w), "area": float(v.sum()), "iscrowd": 0,
                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
            })
        self.counts["images"][split] += 1

    def add_refs(self, rng: np.random.Generator, image_id: int, split: str,
                 specs: list[tuple[list[SceneObject], list[str], bool]]) -> None:
        """One ref per ``(targets, phrases, with sentences?)``; 1–3 of the phrases become its sentences."""
        for targets, phrases, with_sentences in specs:
            sents = _sentences(rng, phrases, self.next_sent) if with_sentences else []
            self.next_sent += len(sents)
            ids = [o.ann_id for o in targets]
            cats = [self.categories.index(o.shape) + 1 for o in targets]
            single_as_int = len(ids) == 1 and self.next_ref % 2 == 0
            self.refs.append({
                "ref_id": self.next_ref, "image_id": image_id, "split": split,
                "file_name": f"COCO_train2014_{image_id:012d}_{self.next_ref}.jpg",
                "ann_id": ids[0] if single_as_int else (ids or [-1]),
                "category_id": cats[0] if single_as_int else (cats or [-1]),
                "sent_ids": [s["sent_id"] for s in sents], "sentences": sents, "no_target": not ids,
            })
            self.next_ref += 1
            self.counts["refs"][split] += 1
            self.counts["samples"][split] += len(sents)
            self.counts["no_target_samples"][split] += len(sents) * (not ids)
            self.counts["multi_target_samples"][split] += len(sents) * (len(ids) > 1)

    def write(self, supercategory: str) -> dict[str, dict[str, int]]:
        """``instances.json`` and ``grefs(unc).json``; the per-split counts."""
        instances = {
            "info": self.info,
            "licenses": [{"id": 1, "name": "CC0"}],
            "images": self.images, "annotations": self.annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": supercategory}
                           for k, c in enumerate(self.categories)],
        }
        (self.ann_dir / "instances.json").write_text(json.dumps(instances, separators=(",", ":")))
        (self.ann_dir / "grefs(unc).json").write_text(json.dumps(self.refs, separators=(",", ":")))
        return {k: {s: int(c[s]) for s in SPLITS} for k, c in self.counts.items()}


def check_sizes(num_images: int, min_size: int, max_size: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 32 <= min_size < max_size:
        raise ValueError(f"need 32 <= min_size < max_size, got {min_size}, {max_size}")


def image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(w, h), never square (the readers and transforms must meet non-square images)."""
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    if w == h:
        w = w - 1 if w > min_size else w + 1
    return w, h


# ------------------------------------------------------------------- generator
def generate_grefcoco(root: str | os.PathLike[str], num_images: int = 200, seed: int = 0, *,
                      min_size: int = 96, max_size: int = 320, jpeg_quality: int = 90) -> dict[str, dict[str, int]]:
    """Write a synthetic gRefCOCO under ``root``; deterministic in ``(num_images, seed)``.

    Returns per-split counts — ``images``, ``refs`` (incl. refs without sentences),
    ``samples`` (sentences), ``no_target_samples``, ``multi_target_samples`` — each a
    ``{split: n}`` dict, for tests to compare with what the readers and ``prepare`` report.
    """
    check_sizes(num_images, min_size, max_size)
    release = Release(root, description=f"{SYNTHETIC_DESCRIPTION_PREFIX} gRefCOCO", seed=seed, num_images=num_images,
                      categories=SHAPES)
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        w, h = image_size(rng, min_size, max_size)
        image_id, split = _IMAGE_ID0 + i, _SPLIT_CYCLE[i % len(_SPLIT_CYCLE)]
        objs = _place_objects(rng, h, w, release.next_ann)
        release.next_ann += len(objs)

        background = np.array([rng.integers(185, 245)] * 3) + rng.integers(-12, 13, size=3)
        pixels = np.empty((h, w, 3), dtype=np.uint8)
        pixels[:] = np.clip(background, 0, 255)
        for o in objs:
            pixels[o.full] = np.clip(np.array(COLOURS[o.colour]) + rng.integers(-20, 21, size=3), 0, 255)
        release.add_image(image_id, split, pixels, objs, jpeg_quality=jpeg_quality)

        # (targets, phrases, keep sentences?) for every ref of this image.
        specs: list[tuple[list[SceneObject], list[str], bool]] = []
        for o in objs:
            phrases = _single_target(o, objs, w)
            if phrases:
                specs.append(([o], phrases, True))
        multi = _multi_target(objs)
        for j in rng.permutation(len(multi))[:2]:
            specs.append((multi[j][0], multi[j][1], True))
        specs.append(([], _no_target(rng, objs), True))
        if i % 8 == 5 and specs[0][0]:  # the release has a few refs without sentences
            specs.append((specs[0][0], specs[0][1], False))
        release.add_refs(rng, image_id, split, specs)
    return release.write("shape")
