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
* **Six formats, nothing else.** Only :data:`ALLOWED_FORMATS` (JPEG, PNG, WebP, BMP, GIF, TIFF)
  are parsed at all: ``Image.open`` is given that list, so the parsers of Pillow's other
  formats (DDS, PSD, ICO, EPS, …) never see the bytes — a crafted 128-byte DDS header made
  one of them raise ``NotImplementedError``, which no ``except OSError`` catches. A file in
  another format Pillow knows is an :class:`UnsupportedImageFormatError` that names it
  (by its signature alone, a guess where two formats share one).
* **Corrupt data fails loudly.** ``Image.open`` is lazy: only ``load()`` decodes, so it is
  always forced here — a truncated JPEG raises instead of yielding a half-grey image.
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` (a process-wide switch) is never touched. Every
  failure — whatever a decoder raises (``OSError``, ``SyntaxError``, ``struct.error``,
  ``NotImplementedError``, …) — is a :class:`CorruptImageError` naming the source, so a
  caller needs one ``except`` to refuse a request or quarantine a record.
* **Bounded input.** Files are read only when they are regular files (a link to
  ``/dev/zero`` or a FIFO is refused, never read forever or waited on) and only up to a byte
  cap; decoding is refused from the header when the picture has more than ``max_pixels``
  pixels, *before* any pixel is decoded (a 0.6 MB JPEG can claim 35 M pixels). Both refusals
  raise :class:`ImageTooLargeError`, so a caller can tell a bomb from a broken file.
* **Speed.** With ``draft_size`` a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
  that still covers the size asked for — the decoder does less work and the later resize
  starts from fewer pixels. Valid only when the caller resizes to ``draft_size`` or
  smaller afterwards (the training transform always does).
"""

from __future__ import annotations

import functools
import io
import os
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from instalign.errors import InstAlignError

__all__ = [
    "ALLOWED_FORMATS",
    "CorruptImageError",
    "ImageTooLargeError",
    "UnsupportedImageFormatError",
    "NotARegularFileError",
    "DEFAULT_MAX_IMAGE_BYTES",
    "read_regular_file",
    "decode_image",
    "open_image",
    "read_image_size",
    "to_rgb",
    "encode_jpeg",
    "resize_long_side",
]


#: Byte cap of :func:`open_image` / :func:`read_regular_file` callers that name none: far above
#: any photograph (COCO's largest JPEG is ~1 MB), far below what would hurt a worker.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024

#: The only encodings parsed (``Image.open(..., formats=...)``): what cameras, browsers and
#: datasets produce. Each extra Pillow parser is attack surface for bytes from strangers.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class CorruptImageError(InstAlignError, ValueError):
    """Bytes that are not a decodable image (truncated, corrupt, unknown format, too large).

    ``detail`` is the message without the leading ``"<source>: "``, for callers that name
    the record their own way."""

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail


class ImageTooLargeError(CorruptImageError):
    """An image over a byte or pixel cap (e.g. a decompression bomb); refused before decoding."""


class UnsupportedImageFormatError(CorruptImageError):
    """An image in a format Pillow knows but :data:`ALLOWED_FORMATS` leaves out (DDS, PSD, ICO, …);
    refused before any of that format's parser runs."""


def _refusal(cls: type[CorruptImageError], source: str, detail: str) -> CorruptImageError:
    return cls(f"{source}: {detail}", detail=detail)


def _too_large(message: str, size: int, limit: int) -> ImageTooLargeError:
    """An ``ImageTooLargeError`` that also carries the byte count seen and the cap."""
    error = ImageTooLargeError(message)
    error.size, error.limit = size, limit
    return error


class NotARegularFileError(InstAlignError, OSError):
    """A path that is not a regular file (a directory, FIFO, device, socket), refused unread."""


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _refuse_irregular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise NotARegularFileError(f"{path}: not a regular file ({kind})")


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes`` of them.

    Symlinks are followed (datasets are often linked into place), but what they point at
    must be a regular file: ``stat`` is checked before opening, the file is opened
    non-blocking (a FIFO swapped in after the check cannot make ``open`` wait for a writer)
    and checked again on the open descriptor, and reading stops one byte past the cap (a
    file growing while read cannot exhaust memory).

    Raises:
        FileNotFoundError, PermissionError, …: the ``OSError`` of ``stat``/``open``.
        NotARegularFileError: a directory, FIFO, device or socket.
        ImageTooLargeError: more than ``max_bytes`` bytes.
    """
    path = os.fspath(path)
    _refuse_irregular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        _refuse_irregular(path, st.st_mode)
        if st.st_size > max_bytes:
            raise _too_large(f"{path}: file is {st.st_size} bytes, over the cap of {max_bytes}", st.st_size, max_bytes)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"{path}: file grew past the cap of {max_bytes} bytes while being read", total, max_bytes)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _pixel_cap(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else (max_pixels or None)


def _check_pixels(img: Image.Image, limit: int | None, source: str) -> None:
    if limit and img.size[0] * img.size[1] > limit:
        raise _refusal(ImageTooLargeError, source, f"image too large to decode safely ({img.size[0]}x{img.size[1]} "
                                                   f"= {img.size[0] * img.size[1]} pixels exceeds the limit of {limit})")


@functools.cache
def _formats() -> tuple[str, ...]:
    """:data:`ALLOWED_FORMATS` this Pillow can open (WebP needs libwebp). ``Image.init()``
    registers every plugin once, so that ``Image.open`` never does it mid-request and
    :func:`_known_format` can name the formats refused."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _known_format(data: bytes) -> str | None:
    """The format outside the allow-list whose signature ``data`` starts with, if any.

    Only Pillow's ``accept`` checks run (comparisons of the first 16 bytes), never a parser.
    ``None`` when an allowed format claims the bytes (then they are a corrupt image of that
    format) or none does (not an image)."""
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            claimed = accept is not None and not isinstance(result := accept(prefix), str) and bool(result)
        except Exception:  # noqa: BLE001 - a signature check that fails claims nothing
            claimed = False
        if claimed:
            return None if name in ALLOWED_FORMATS else name
    return None


def _open(data: bytes, source: str) -> Image.Image:
    """``Image.open`` limited to the allowed formats (lazy: the header only)."""
    try:
        return Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError:
        other = _known_format(data)
        allowed = ", ".join(_formats())
        if other:
            raise _refusal(UnsupportedImageFormatError, source,
                           f"unsupported image format (its signature is {other}'s; accepted: {allowed})") from None
        raise _refusal(CorruptImageError, source, f"corrupt or not an image (not a readable {allowed} file)") from None


def _decoder_failure(exc: Exception, source: str) -> CorruptImageError:
    """Whatever a decoder raised, as the one error callers catch (see the module policies)."""
    if isinstance(exc, (Image.DecompressionBombError, MemoryError)):  # PIL's own refusal; or no memory for it
        return _refusal(ImageTooLargeError, source, f"image too large to decode safely ({exc})")
    kind = "truncated" if "truncated" in str(exc).lower() else "corrupt or not an image"
    return _refusal(CorruptImageError, source, f"{kind} ({type(exc).__name__}: {exc})")


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
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode ``data`` to an RGB ``PIL.Image`` (fully loaded).

    ``draft_size=(w, h)``: allow the JPEG decoder to downscale to no less than ``(w, h)``.
    ``exif_transpose``: apply the EXIF orientation tag (off for dataset images, see above).
    ``max_pixels``: refuse (:class:`ImageTooLargeError`) from the header a picture with more
    pixels; ``None``: ``PIL.Image.MAX_IMAGE_PIXELS``; ``0``: no cap of our own (PIL's own
    refusal above twice its limit still applies).

    Raises:
        CorruptImageError: always, whatever went wrong (subclasses: too large, unsupported format).
    """
    try:
        img = _open(data, source)
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; refuse here instead of
        # flipping the process-wide warnings filter (not thread-safe) to make it raise.
        _check_pixels(img, _pixel_cap(max_pixels), source)
        if draft_size is not None and img.format == "JPEG":
            # Mode stays as stored (draft("RGB") would also convert CMYK badly); size only.
            img.draft(img.mode, (int(draft_size[0]), int(draft_size[1])))
        img.load()  # forces the decode: truncation and corruption surface here
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except CorruptImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a refusal, see the module policies
        raise _decoder_failure(exc, source) from exc


def open_image(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, **kwargs) -> Image.Image:
    """Read the regular file at ``path`` (:func:`read_regular_file`, at most ``max_bytes``) and
    :func:`decode_image` it; every failure is a :class:`CorruptImageError` naming the path."""
    path = os.fspath(path)
    try:
        data = read_regular_file(path, max_bytes=max_bytes)
    except NotARegularFileError as exc:
        raise CorruptImageError(f"cannot read {exc}") from exc
    except OSError as exc:
        raise CorruptImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, source=path, **kwargs)


def read_image_size(data: bytes, *, source: str = "<bytes>", max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel decode); as stored, EXIF ignored.

    ``max_pixels`` as in :func:`decode_image`: a header claiming more is refused here already.

    Raises:
        CorruptImageError: always, whatever went wrong (subclasses: too large, unsupported format).
    """
    try:
        with _open(data, source) as img:
            _check_pixels(img, _pixel_cap(max_pixels), source)
            return img.size
    except CorruptImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a refusal, see the module policies
        raise _decoder_failure(exc, source) from exc


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
