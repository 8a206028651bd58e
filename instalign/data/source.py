"""In-memory form of an official release, as the readers return it (DESIGN §3).

Every reader (gRefCOCO, Ref-ZOM, RefCOCO/+/g) yields a ``GRESSource``; ``prepare``
consumes nothing else, so each dataset's quirks stay inside its reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    path: str  # absolute path (or URI) of the image file
    width: int  # as the annotation file states
    height: int


@dataclass(frozen=True)
class Annotation:
    ann_id: int
    image_id: int
    category_id: int
    #: COCO segmentation exactly as released: a list of polygons, or an RLE dict
    #: (``counts`` a list — uncompressed — or a string — compressed) with ``size`` [h, w].
    segmentation: Any


@dataclass(frozen=True)
class Sentence:
    sent_id: int
    text: str


@dataclass(frozen=True)
class Ref:
    ref_id: int
    image_id: int
    split: str
    ann_ids: tuple[int, ...]  # empty for a no-target ref
    sentences: tuple[Sentence, ...]  # may be empty: such a ref yields no samples
    no_target: bool


@dataclass
class GRESSource:
    """One dataset as released: images, annotations and refs, keyed by id."""

    dataset: str  # "grefcoco" | "refzom" | "refcoco" | "refcoco+" | "refcocog"
    images: dict[int, ImageInfo]
    annotations: dict[int, Annotation]
    refs: list[Ref]
    #: Source files read (path → sha256), for the manifest.
    checksums: dict[str, str] = field(default_factory=dict)
    #: ``instances.json``'s COCO ``info`` block as released (empty when it has none): it says
    #: what the release is — e.g. ``instalign.data.synthetic``'s description marks a synthetic one.
    info: dict[str, Any] = field(default_factory=dict)

    def splits(self) -> list[str]:
        return sorted({r.split for r in self.refs})
