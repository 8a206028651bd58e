"""Tiny releases in the official on-disk formats, for reader and prepare tests.

Each writer lays out one dataset exactly as its release does (file names, JSON/pickle, COCO
``instances.json``, protocol-2 pickles as the REFER originals) with every quirk the readers
must handle, and returns what a correct reader must produce: ``{ref_id: Expected}``.
Images are real (tiny) JPEGs of the sizes ``instances.json`` states.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from instalign.data.masks import counts_to_runs, rle_encode

__all__ = ["Expected", "write_grefcoco", "write_refzom", "write_refcoco", "rect_mask", "write_instances"]


@dataclass(frozen=True)
class Expected:
    image_id: int
    split: str
    ann_ids: tuple[int, ...]
    no_target: bool
    texts: tuple[str, ...]


def rect_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    # pycocotools rasterises this to exactly rect_mask(..., x0, y0, x1, y1).
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _sent(sent_id: int, raw: str, sent: str | None = None) -> dict:
    sent = raw.lower().strip(" .") if sent is None else sent
    return {"tokens": sent.split(), "raw": raw, "sent": sent, "sent_id": sent_id}


def write_instances(path: Path, image_dir: Path, images: list[dict], annotations: list[dict]) -> None:
    """COCO ``instances.json`` plus a JPEG per image (grey, the stated size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (128, 128, 128)).save(image_dir / img["file_name"], quality=90)
    cats = [{"id": k, "name": n, "supercategory": "thing"} for k, n in ((1, "person"), (2, "dog"), (3, "cat"))]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                                "categories": cats}))


def _coco_images(specs: list[tuple[int, int, int]], prefix: str = "COCO_train2014") -> list[dict]:
    return [{"id": i, "width": w, "height": h, "file_name": f"{prefix}_{i:012d}.jpg", "license": 1}
            for i, w, h in specs]


# ----------------------------------------------------------------- gRefCOCO
def write_grefcoco(root: Path) -> dict[int, Expected]:
    """``<root>/grefcoco/grefs(unc).json`` + ``instances.json`` + ``images/train2014``.

    Quirks: ann_id int / list / [-1]; category_id int / list; a ref without sentences (empty
    list) and one without the key; ``no_target`` disagreeing with ann_id both ways; polygon,
    compressed and uncompressed RLE; a degenerate polygon next to a valid one; a crowd
    annotation in a multi-target set and as a ref's only target; RefCOCO-suffixed file_name;
    an empty ``raw`` falling back to ``sent``.
    """
    images = _coco_images([(1001, 40, 30), (1002, 50, 40), (1003, 30, 30)])
    m12 = rect_mask(30, 40, 20, 10, 35, 25)
    m13 = rect_mask(40, 50, 0, 0, 10, 40)
    m14 = rect_mask(40, 50, 30, 5, 45, 35)
    annotations = [
        {"id": 11, "image_id": 1001, "category_id": 1, "iscrowd": 0, "area": 225.0, "bbox": [5, 5, 15, 15],
         "segmentation": [_poly(5, 5, 20, 20), [1.0, 1.0, 2.0, 2.0]]},  # 2nd polygon has 2 points: dropped
        {"id": 12, "image_id": 1001, "category_id": 2, "iscrowd": 0, "area": 225.0, "bbox": [20, 10, 15, 15],
         "segmentation": {"size": [30, 40], "counts": rle_encode(m12)}},
        {"id": 13, "image_id": 1002, "category_id": 1, "iscrowd": 0, "area": 400.0, "bbox": [0, 0, 10, 40],
         "segmentation": {"size": [40, 50], "counts": counts_to_runs(rle_encode(m13)).tolist()}},
        {"id": 14, "image_id": 1002, "category_id": 3, "iscrowd": 1, "area": 450.0, "bbox": [30, 5, 15, 30],
         "segmentation": {"size": [40, 50], "counts": counts_to_runs(rle_encode(m14)).tolist()}},
        {"id": 15, "image_id": 1002, "category_id": 1, "iscrowd": 0, "area": 100.0, "bbox": [12, 12, 10, 10],
         "segmentation": [_poly(12, 12, 22, 22)]},
        {"id": 16, "image_id": 1003, "category_id": 2, "iscrowd": 0, "area": 100.0, "bbox": [0, 0, 10, 10],
         "segmentation": [_poly(0, 0, 10, 10)]},
    ]
    write_instances(root / "grefcoco" / "instances.json", root / "images" / "train2014", images, annotations)

    def ref(ref_id: int, image_id: int, split: str, ann_id: Any, cat: Any, sents: list[dict] | None,
            no_target: bool) -> dict:
        r = {"ref_id": ref_id, "image_id": image_id, "split": split, "ann_id": ann_id, "category_id": cat,
             "file_name": f"COCO_train2014_{image_id:012d}_{ref_id + 3}.jpg", "no_target": no_target}
        if sents is not None:
            r["sentences"] = sents
            r["sent_ids"] = [s["sent_id"] for s in sents]
        return r

    refs = [
        ref(0, 1001, "train", 11, 1, [_sent(100, "The person on the left."), _sent(101, "left guy")], False),
        ref(1, 1001, "train", [11, 12], [1, 2], [_sent(102, "person and dog")], False),
        ref(2, 1001, "val", [-1], [-1], [_sent(103, "the cat")], True),
        ref(3, 1002, "val", [13, 14], [1, 3], [_sent(104, "everyone")], False),  # 14 is crowd
        ref(4, 1002, "val", [14], [3], [_sent(105, "the crowd")], False),  # only a crowd target
        ref(5, 1002, "testA", [15], [1], [], False),  # released without sentences
        ref(6, 1003, "testB", [-1], [-1], [_sent(106, "a horse")], False),  # flag disagrees: ann_id wins
        ref(7, 1003, "testB", [16], [2], [_sent(107, "", "the dog")], True),  # flag disagrees; empty raw
        ref(8, 1003, "testB", 16, 2, None, False),  # no 'sentences' key at all
    ]
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return {
        0: Expected(1001, "train", (11,), False, ("The person on the left.", "left guy")),
        1: Expected(1001, "train", (11, 12), False, ("person and dog",)),
        2: Expected(1001, "val", (), True, ("the cat",)),
        3: Expected(1002, "val", (13,), False, ("everyone",)),
        4: Expected(1002, "val", (14,), False, ("the crowd",)),
        5: Expected(1002, "testA", (15,), False, ()),
        6: Expected(1003, "testB", (), True, ("a horse",)),
        7: Expected(1003, "testB", (16,), False, ("the dog",)),
        8: Expected(1003, "testB", (16,), False, ()),
    }


# ------------------------------------------------------------------ Ref-ZOM
def write_refzom(root: Path) -> dict[int, Expected]:
    """``<root>/ref-zom/refs(final).p`` (protocol 2) + ``instances.json`` + ``images/trainval2014``.

    Images from train2014 *and* val2014 in one folder; ``source`` 'one' / 'many' / 'zero'
    (a zero ref keeps a placeholder ann_id, which must be ignored); splits train / test.
    """
    images = (_coco_images([(2001, 32, 24)], "COCO_train2014") + _coco_images([(2002, 24, 32)], "COCO_val2014"))
    annotations = [
        {"id": 21, "image_id": 2001, "category_id": 1, "iscrowd": 0, "segmentation": [_poly(2, 2, 12, 12)]},
        {"id": 22, "image_id": 2001, "category_id": 1, "iscrowd": 0, "segmentation": [_poly(14, 2, 30, 20)]},
        {"id": 23, "image_id": 2002, "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": [32, 24], "counts": rle_encode(rect_mask(32, 24, 4, 4, 20, 28))}},
    ]
    write_instances(root / "ref-zom" / "instances.json", root / "images" / "trainval2014", images, annotations)
    refs = [
        {"ref_id": 0, "image_id": 2001, "split": "train", "ann_id": 21, "category_id": 1, "source": "one",
         "file_name": "COCO_train2014_000000002001_1.jpg", "sent_ids": [0], "sentences": [_sent(0, "small man")]},
        {"ref_id": 1, "image_id": 2001, "split": "train", "ann_id": [21, 22], "category_id": [1, 1], "source": "many",
         "file_name": "COCO_train2014_000000002001_2.jpg", "sent_ids": [1, 2],
         "sentences": [_sent(1, "two men"), _sent(2, "both people")]},
        {"ref_id": 2, "image_id": 2002, "split": "test", "ann_id": 23, "category_id": 2, "source": "zero",
         "file_name": "COCO_val2014_000000002002_3.jpg", "sent_ids": [3], "sentences": [_sent(3, "the giraffe")]},
        {"ref_id": 3, "image_id": 2002, "split": "test", "ann_id": [23], "category_id": [2], "source": "one",
         "file_name": "COCO_val2014_000000002002_4.jpg", "sent_ids": [4], "sentences": [_sent(4, "the dog")]},
    ]
    with open(root / "ref-zom" / "refs(final).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {
        0: Expected(2001, "train", (21,), False, ("small man",)),
        1: Expected(2001, "train", (21, 22), False, ("two men", "both people")),
        2: Expected(2002, "test", (), True, ("the giraffe",)),
        3: Expected(2002, "test", (23,), False, ("the dog",)),
    }


# ------------------------------------------------------------ RefCOCO/+/g
def write_refcoco(root: Path, dataset: str = "refcoco", split_by: str = "unc") -> dict[int, Expected]:
    """``<root>/<dataset>/refs(<split_by>).p`` (protocol 2) + ``instances.json`` + ``images/train2014``."""
    images = _coco_images([(3001, 20, 16)])
    annotations = [
        {"id": 31, "image_id": 3001, "category_id": 1, "iscrowd": 0, "segmentation": [_poly(1, 1, 8, 8)]},
        {"id": 32, "image_id": 3001, "category_id": 3, "iscrowd": 0, "segmentation": [_poly(10, 2, 19, 15)]},
    ]
    write_instances(root / dataset / "instances.json", root / "images" / "train2014", images, annotations)
    splits = ("train", "val", "test") if dataset == "refcocog" else ("train", "testA", "testB")
    refs = [
        {"ref_id": 40 + k, "image_id": 3001, "split": splits[k], "ann_id": 31 + k % 2, "category_id": 1 + 2 * (k % 2),
         "file_name": f"COCO_train2014_000000003001_{31 + k % 2}.jpg", "sent_ids": [50 + k],
         "sentences": [_sent(50 + k, f"THING NUMBER {k}", f"thing number {k}")]}
        for k in range(3)
    ]
    with open(root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {40 + k: Expected(3001, splits[k], (31 + k % 2,), False, (f"THING NUMBER {k}",)) for k in range(3)}
