"""Small files in image formats Pillow knows but ``instalign.data.images.ALLOWED_FORMATS``
leaves out: what a stranger can send to serving, or drop into a dataset."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def dds_header() -> bytes:
    """128 bytes: a DDS header (magic, 124-byte header, 16×16, a made-up FourCC). Pillow's DDS
    parser raised ``NotImplementedError`` on it — no ``OSError``, so it escaped every caller."""
    header = struct.pack("<4s7I", b"DDS ", 124, 0x1007, 16, 16, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<II4s5I", 32, 0x4, b"ZZZZ", 0, 0, 0, 0, 0)
    return header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0)


def psd_header() -> bytes:
    """A PSD (Photoshop) header Pillow would parse: 16×16, 3 channels, 8 bits, RGB."""
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 16, 16, 8, 3) + bytes(12)


def ico_file() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="ICO")
    return buf.getvalue()


#: Format name → file bytes.
OTHER_FORMATS = {"DDS": dds_header(), "PSD": psd_header(), "ICO": ico_file()}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` 8-bit gray pixels, with one tiny IDAT:
    what a decompression bomb looks like to anything that trusts the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
