"""A COCO-sized gRefCOCO release for the data benchmarks, written in the exact on-disk layout.

640×480 photo-like JPEGs (~COCO's file size: a smooth colour field with fine noise, not a
flat fill), 7 polygon instances of 16–40 vertices per image (~COCO's mean), single-, multi-
and no-target refs with 1–2 sentences each, so the real reader and ``prepare`` meet data
shaped like the release rather than the tiny test set. :func:`release_owns` says which files
it wrote, so ``instalign bench data --work-dir`` replaces only those.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pyarrow.fs import LocalFileSystem

from pipelines.core.output_dirs import MARKER_NAME, claim_output

__all__ = ["make_coco_like", "release_owns"]

WORDS = dict(
    colour=["red", "blue", "green", "white", "black", "brown", "yellow", "gray"],
    thing=["person", "man", "woman", "dog", "cat", "car", "chair", "table", "cup", "bottle", "bus", "horse"],
    where=["on the left", "on the right", "in the middle", "at the back", "in front", "near the table",
           "next to the window", "behind the man"],
)


def _polygon(rng: np.random.Generator, w: int, h: int) -> list[float]:
    """A star-shaped polygon with 16–40 vertices (COCO polygons are detailed)."""
    n = int(rng.integers(16, 41))
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    r = rng.uniform(0.05, 0.25) * min(w, h)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + rad * np.cos(ang), 0, w - 1)
    ys = np.clip(cy + rad * np.sin(ang), 0, h - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def _picture(rng: np.random.Generator, w: int, h: int, polys: list[list[float]]) -> Image.Image:
    # Smooth colour field + fine noise: compresses like a photo (~100-200 KB at q90), not like a flat fill.
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
    base += rng.integers(-18, 19, size=(h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for p in polys:
        draw.polygon(p, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


#: What :func:`make_coco_like` writes under a release root (relative paths; directories end with ``/``).
_RELEASE_FILE = re.compile(r"totals\.json|grefcoco/(instances\.json|grefs\(unc\)\.json)?|images/(train2014/"
                           r"(COCO_train2014_\d{12}\.jpg)?)?")


def release_owns(rel: str) -> bool:
    """Whether ``rel`` is part of a release this benchmark generated (``pipelines.core.output_dirs``'s ``owns``)."""
    return rel == MARKER_NAME or _RELEASE_FILE.fullmatch(rel) is not None


def make_coco_like(root: str | Path, *, num_images: int, seed: int = 0, instances: int = 7) -> dict:
    """Write ``num_images`` COCO-sized images + refs in the gRefCOCO layout; return totals.

    The marker goes first (``output_dirs.claim_output``): a later run may replace this release."""
    root = Path(root)
    claim_output(LocalFileSystem(), str(root.absolute()))
    image_dir, ann_dir = root / "images" / "train2014", root / "grefcoco"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns, refs = [], [], []
    sent_id = 0
    for i in range(num_images):
        image_id, w, h = 1_000_000 + i, 640, 480
        polys = [_polygon(rng, w, h) for _ in range(instances)]
        _picture(rng, w, h, polys).save(image_dir / f"COCO_train2014_{image_id:012d}.jpg", quality=90)
        images.append(dict(id=image_id, file_name=f"COCO_train2014_{image_id:012d}.jpg", width=w, height=h))
        ids = []
        for p in polys:
            ids.append(len(anns) + 1)
            anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=1, segmentation=[p], iscrowd=0,
                             area=0.0, bbox=[0, 0, 1, 1]))
        targets = [[a] for a in ids] + [list(rng.choice(ids, size=int(rng.integers(2, 4)), replace=False))
                                        for _ in range(2)] + [[]]
        for t in targets:
            sents = []
            for _ in range(int(rng.integers(1, 3))):
                text = " ".join([str(rng.choice(WORDS[k])) for k in ("colour", "thing", "where")])
                sents.append(dict(raw=text, sent=text, tokens=text.split(), sent_id=sent_id))
                sent_id += 1
            refs.append(dict(ref_id=len(refs), image_id=image_id, split="train", ann_id=[int(a) for a in t] or [-1],
                             category_id=[1] * len(t) or [-1], sentences=sents, no_target=not t,
                             file_name=f"COCO_train2014_{image_id:012d}_{len(refs)}.jpg"))
    (ann_dir / "instances.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=[
        dict(id=1, name="thing", supercategory="thing")])))
    (ann_dir / "grefs(unc).json").write_text(json.dumps(refs))
    return dict(images=num_images, annotations=len(anns), refs=len(refs), samples=sent_id)
