"""Image bytes ↔ RGB pictures, fast and strict (DESIGN §3 prepare, §6.10 one transform).

Policies, in one place:

* **Always RGB.** Grayscale (``L``, ``1``), palette (``P``), CMYK and YCbCr are converted with
  PIL's own colour conversion; alpha (``RGBA``, ``LA``, ``PA``) is dropped (COCO images carry
  none); 16-bit and float grayscale (``I;16``, ``I``, ``F``) are scaled to 8 bits from their
  full range (``I;16``: /257) rather than clipped.
* **EXIF orientation is not applied by default.** COCO annotations (polygons, RLE, and the
  ``width``/``height`` in ``instances.json``) refer to the stored pixel grid, so a dataset
  image must be decoded as stored; a rotated decode would misalign every mask (``prepare``
  checks the decoded size against the annotation's). ``exif_transpose=True`` is for user
  photos (the predictor, serving), where the upright view is what the user describes.
* **Corrupt data fails loudly.** ``Image.open`` is lazy: only ``load()`` decodes, so it is
  always forced here — a truncated JPEG raises instead of yielding a half-grey image.
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` (a process-wide switch) is never touched. Every
  failure is a :class:`CorruptImageError` naming the source.
* **Speed.** With ``draft_size`` a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
  that still covers the size asked for — the decoder does less work and the later resize
  starts from fewer pixels. Valid only when the caller resizes to ``draft_size`` or
  smaller afterwards (the training transform always does).
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "CorruptImageError",
    "decode_image",
    "open_image",
    "read_image_size",
    "to_rgb",
    "encode_jpeg",
    "resize_long_side",
]


class CorruptImageError(ValueError):
    """Bytes that are not a decodable image (truncated, corrupt, unknown format, too large)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB (see the module policies)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")  # alpha dropped, colour kept
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes,
    *,
    source: str = "<bytes>",
    draft_size: tuple[int, int] | None = None,
    exif_transpose: bool = False,
) -> Image.Image:
    """Decode ``data`` to an RGB ``PIL.Image`` (fully loaded).

    ``draft_size=(w, h)``: allow the JPEG decoder to downscale to no less than ``(w, h)``.
    ``exif_transpose``: apply the EXIF orientation tag (off for dataset images, see above).
    """
    try:
        img = Image.open(io.BytesIO(data))
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; refuse here instead of
        # flipping the process-wide warnings filter (not thread-safe) to make it raise.
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.size[0] * img.size[1] > limit:
            raise Image.DecompressionBombError(f"{img.size[0]}x{img.size[1]} pixels exceeds the limit of {limit}")
        if draft_size is not None and img.format == "JPEG":
            # Mode stays as stored (draft("RGB") would also convert CMYK badly); size only.
            img.draft(img.mode, (int(draft_size[0]), int(draft_size[1])))
        img.load()  # forces the decode: truncation and corruption surface here
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(f"{source}: image too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, struct.error) as exc:
        kind = "truncated" if "truncated" in str(exc) else "corrupt or not an image"
        raise CorruptImageError(f"{source}: {kind} ({type(exc).__name__}: {exc})") from exc


def open_image(path: str | os.PathLike[str], **kwargs) -> Image.Image:
    """Read the file at ``path`` and :func:`decode_image` it (errors name the path)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CorruptImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, source=path, **kwargs)


def read_image_size(data: bytes, *, source: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel decode); as stored, EXIF ignored."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, struct.error) as exc:  # struct.error: some plugins leak it
        raise CorruptImageError(f"{source}: corrupt or not an image ({exc})") from exc


def resize_long_side(img: Image.Image, long_side: int, *, resample: int = Image.BILINEAR) -> Image.Image:
    """Downscale so the longer side is ``long_side`` (aspect kept); never upscales.

    ``reducing_gap`` lets PIL box-reduce by an integer factor first (``Image.reduce``), then
    resample the rest — much faster than one big bilinear pass, visually identical.
    """
    w, h = img.size
    scale = long_side / max(w, h)
    if scale >= 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, resample, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, *, quality: int = 90) -> bytes:
    """Baseline JPEG bytes of an RGB image (4:2:0 as libjpeg defaults; no metadata kept)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()
