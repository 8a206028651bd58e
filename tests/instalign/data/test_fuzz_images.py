"""Fuzz: image bytes, mutated, through every decoder the project exposes (issue "no input that crashes").

Seeds are a valid tiny image of every format Pillow can both write and read, a few variants
(DXT-compressed DDS, progressive JPEG, 16-bit and palette PNG, animated GIF, compressed
TIFF), and hand-built headers of formats Pillow only reads (PSD, CUR, DCX, SUN, XPM, GBR,
FITS, XV thumbnail) or only identifies (EPS, BUFR, GRIB, HDF5, WMF). Each case flips, sets,
overwrites (32-bit fields with 0, 1, 2^31-1, 2^32-1 …), inserts, deletes or truncates bytes,
mostly in the first 64 — where the headers are.

Properties: ``instalign.data.images.read_image_size`` and ``decode_image`` give a size / an
RGB image or raise ``CorruptImageError``; the serving parser ``pipelines.models.pyfunc.image_size``
and ``decode_image`` give a size / an image or raise ``PyfuncInputError`` (a 400). Decoding
is tried only below a pixel cap, as every caller does (prepare's ``max_image_pixels``, the
serving request's ``max_pixels``).
"""

from __future__ import annotations

import io
import struct
import warnings

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from tests.support.fuzz_support import fuzz_settings, run_case

#: Decode only headers at most this big (the callers' caps are larger; this bounds CI time).
DECODE_PIXELS = 1_000_000


def _saved(fmt: str, mode: str = "RGB", size=(8, 6), **options) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, 1 if mode in ("1", "P", "L", "I;16") else (200, 30, 90, 255)[:len(mode)])
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _animated_gif() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("P", (8, 6), k) for k in (1, 2, 3)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    return buf.getvalue()


def _written_seeds() -> dict[str, bytes]:
    """One valid tiny file per format Pillow both writes and reads here, plus variants."""
    Image.init()
    seeds = {}
    for fmt in sorted(set(Image.SAVE) & set(Image.OPEN)):
        for mode in ("RGB", "L", "1", "P", "RGBA"):
            try:
                # Pillow deprecates some of these formats (IM, 2026): writing one is this seed's
                # point — the decoders must refuse it — so its DeprecationWarning is expected here.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    data = _saved(fmt, mode)
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
            except Exception:  # noqa: BLE001 - a format/mode this Pillow cannot round-trip
                continue
            seeds[fmt] = data
            break
    seeds.update({
        "DDS-DXT1": _saved("DDS", "RGBA", (8, 8), pixel_format="DXT1"),
        "DDS-DXT5": _saved("DDS", "RGBA", (8, 8), pixel_format="DXT5"),
        "JPEG-progressive": _saved("JPEG", progressive=True),
        "PNG-16bit": _saved("PNG", "I;16"),
        "PNG-palette": _saved("PNG", "P"),
        "GIF-animated": _animated_gif(),
        "TIFF-lzw": _saved("TIFF", compression="tiff_lzw"),
        "TIFF-jpeg": _saved("TIFF", compression="jpeg"),
    })
    return seeds


def _psd(w: int = 8, h: int = 6) -> bytes:
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3) + struct.pack(">IIIH", 0, 0, 0, 0)
            + bytes(3 * w * h))


def _sun(w: int = 8, h: int = 6) -> bytes:
    return struct.pack(">8I", 0x59A66A95, w, h, 24, 3 * w * h, 1, 0, 0) + bytes(3 * w * h)


def _dcx(pcx: bytes) -> bytes:
    return struct.pack("<III", 0x3ADE68B1, 12, 0) + pcx


def _gbr(w: int = 8, h: int = 6) -> bytes:
    name = b"fuzz\0"
    return struct.pack(">IIIII", 28 + len(name), 2, w, h, 1) + b"GIMP" + struct.pack(">I", 10) + name + bytes(w * h)


def _fits(w: int = 8, h: int = 6) -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             f"NAXIS1  = {w:20d}", f"NAXIS2  = {h:20d}", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + bytes(w * h).ljust(2880, b"\0")


def _xpm() -> bytes:
    rows = ",\n".join('"' + "ab" * 4 + '"' for _ in range(6))
    return (b'/* XPM */\nstatic char *fuzz[] = {\n"8 6 2 1",\n"a c #FF0000",\n"b c #00FF00",\n'
            + rows.encode() + b"\n};\n")


def _header_seeds(written: dict[str, bytes]) -> dict[str, bytes]:
    """Formats Pillow reads but cannot write, and stub formats it only identifies."""
    seeds = {"PSD": _psd(), "SUN": _sun(), "GBR": _gbr(), "FITS": _fits(), "XPM": _xpm(),
             "XVTHUMB": b"P7 332\n#XVVERSION:fuzz\n#END_OF_COMMENTS\n8 6 255\n" + bytes(48),
             "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 6\n%%EndComments\nshowpage\n%%EOF\n",
             "BUFR": b"BUFR" + bytes(60), "GRIB": b"GRIB" + bytes(12) + b"\x01" + bytes(40),
             "HDF5": b"\x89HDF\r\n\x1a\n" + bytes(56), "WMF": b"\xd7\xcd\xc6\x9a" + bytes(18) + b"\x01\x00\x09\x00"}
    if "PCX" in written:
        seeds["DCX"] = _dcx(written["PCX"])
    if "ICO" in written:
        seeds["CUR"] = written["ICO"][:2] + b"\x02" + written["ICO"][3:]
    return seeds


WRITTEN = _written_seeds()
SEEDS = {**WRITTEN, **_header_seeds(WRITTEN)}
_WORDS = (0, 1, 0x7F, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


@st.composite
def mutated_images(draw) -> tuple[str, bytes]:
    """``(seed name, bytes)``: a seed with 0-4 edits (0: the valid seed), biased to the first 64 bytes."""
    # Half the cases start from the formats that are parsed (the others are refused by name).
    name = draw(st.sampled_from(sorted(SEEDS)) | st.sampled_from(sorted(n for n in SEEDS if _allowed(n))))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 4))):
        span = len(data) if draw(st.booleans()) else min(len(data), 64)
        pos = draw(st.integers(0, max(span - 1, 0)))
        op = draw(st.sampled_from(("flip", "byte", "word", "insert", "delete", "truncate")))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "word":
            word = draw(st.sampled_from(_WORDS) | st.integers(0, 2**32 - 1))
            data[pos:pos + 4] = struct.pack(draw(st.sampled_from(("<I", ">I"))), word)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return name, bytes(data)


def _allowed(name: str) -> bool:
    from instalign.data.images import ALLOWED_FORMATS

    return name.split("-")[0] in ALLOWED_FORMATS


def test_every_seed_is_an_allowed_image_or_refused_by_format():
    """The seeds are what they claim: the fuzzing starts from real headers, not noise — those of
    the allowed formats read, every other format is refused (by name where its signature is
    known; IM, SPIDER and GRIB have none that Pillow checks without its plugin)."""
    from instalign.data.images import CorruptImageError, UnsupportedImageFormatError, read_image_size

    assert len(WRITTEN) >= 15, sorted(WRITTEN)  # Pillow 10+ writes at least these many formats here
    for name, data in SEEDS.items():
        if _allowed(name):
            assert read_image_size(data) >= (1, 1), name
        else:
            with pytest.raises(CorruptImageError) as refused:
                read_image_size(data)
            assert name in ("IM", "SPIDER", "GRIB") or refused.type is UnsupportedImageFormatError, name


#: A DDS header whose pixel-format flags Pillow does not know (Pillow raised NotImplementedError).
DDS_UNKNOWN_FLAGS = ("DDS", _saved("DDS")[:80] + struct.pack("<I", 0x4000) + _saved("DDS")[84:])


@fuzz_settings()
@given(case=mutated_images())
@example(case=DDS_UNKNOWN_FLAGS)
def test_library_decoder_gives_an_image_or_a_corrupt_image_error(case):
    from instalign.data.images import CorruptImageError, decode_image, read_image_size

    name, data = case

    def call():
        width, height = read_image_size(data, max_pixels=DECODE_PIXELS)
        img = decode_image(data, max_pixels=DECODE_PIXELS)
        assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
        return width, height

    run_case("image bytes: instalign.data.images", case, call, refusals=(CorruptImageError,))


@fuzz_settings()
@given(case=mutated_images())
@example(case=DDS_UNKNOWN_FLAGS)
def test_serving_image_parser_gives_an_image_or_a_400(case):
    from pipelines.models.pyfunc import PyfuncInputError, decode_image, image_size

    name, data = case

    def call():
        width, height = image_size("fuzz image", data)
        if width * height <= DECODE_PIXELS:
            assert decode_image("fuzz image", data).mode == "RGB"
        return width, height

    run_case("image bytes: serving (pyfunc.image_size/decode_image)", case, call, refusals=(PyfuncInputError,),
             status=lambda e: e.get_http_status_code())


if __name__ == "__main__":  # pragma: no cover - list the seeds
    for k, v in sorted(SEEDS.items()):
        print(f"{k:18s} {len(v):6d} bytes")
    pytest.main([__file__, "-q"])
