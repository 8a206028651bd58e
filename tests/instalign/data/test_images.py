"""Hostile image files: irregular files are refused unread, bytes and pixels are capped (issue 11);
only JPEG, PNG, WEBP, BMP, GIF and TIFF are parsed, and any decoder failure is one clean refusal."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instalign.data.images import (CorruptImageError, ImageTooLargeError, NotARegularFileError, decode_image,
                                   open_image, read_image_size, read_regular_file)
from tests.support.hostile_images import OTHER_FORMATS, dds_header, png_header_only


def _jpeg(size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _returns_within(fn, seconds: float = 20.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds}s"
    return box


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "image.jpg"
    os.mkfifo(fifo)
    box = _returns_within(lambda: open_image(fifo))
    assert isinstance(box.get("error"), CorruptImageError), box
    assert "FIFO" in str(box["error"]) and str(fifo) in str(box["error"])
    box = _returns_within(lambda: read_regular_file(fifo))
    assert isinstance(box.get("error"), NotARegularFileError), box


def test_symlink_to_dev_zero_is_refused_unread(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    box = _returns_within(lambda: open_image(link))
    assert isinstance(box.get("error"), CorruptImageError) and "character device" in str(box["error"]), box


def test_symlink_to_a_regular_file_is_followed(tmp_path):
    real = tmp_path / "real.jpg"
    real.write_bytes(_jpeg())
    link = tmp_path / "link.jpg"
    link.symlink_to(real)
    assert read_regular_file(link) == real.read_bytes()
    assert open_image(link).size == (32, 24)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(NotARegularFileError, match="a directory"):
        read_regular_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "absent.jpg")


def test_byte_cap(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg() + b"\0" * 4096)
    with pytest.raises(ImageTooLargeError, match="over the cap of 1000"):
        read_regular_file(path, max_bytes=1000)
    with pytest.raises(ImageTooLargeError):
        open_image(path, max_bytes=1000)
    assert len(read_regular_file(path, max_bytes=1 << 20)) == path.stat().st_size


def test_decompression_bomb_is_too_large_not_a_crash():
    bomb = png_header_only(30000, 30000)  # 900 M pixels in ~100 bytes: PIL's own refusal (> 2x its limit)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match="too large"):
        read_image_size(bomb, source="bomb.png")
    with pytest.raises(ImageTooLargeError, match="bomb.png: image too large"):
        decode_image(bomb, source="bomb.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_cap_is_checked_on_the_header():
    data = png_header_only(4000, 3000)  # 12 M pixels claimed, the pixel data is not even there
    with pytest.raises(ImageTooLargeError, match="12000000 pixels exceeds the limit of 1000000"):
        read_image_size(data, source="x.png", max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 1000000"):
        decode_image(data, source="x.png", max_pixels=1_000_000)
    assert read_image_size(data, max_pixels=20_000_000) == (4000, 3000)  # under the cap: the header is fine
    with pytest.raises(CorruptImageError) as err:  # ... and the missing pixel data is then a corrupt image
        decode_image(data, max_pixels=20_000_000)
    assert not isinstance(err.value, ImageTooLargeError)
    assert decode_image(_jpeg(), max_pixels=32 * 24).size == (32, 24)


def test_corrupt_image_is_not_too_large():
    with pytest.raises(CorruptImageError) as err:
        read_image_size(b"not an image", source="x")
    assert not isinstance(err.value, ImageTooLargeError)


def test_open_image_still_names_the_path(tmp_path: Path):
    with pytest.raises(CorruptImageError, match="missing.jpg: cannot read"):
        open_image(tmp_path / "missing.jpg")


# --- formats outside the allow-list ------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_formats_outside_the_allow_list_are_refused_in_one_line(name):
    from instalign.data.images import UnsupportedImageFormatError

    data = OTHER_FORMATS[name]
    assert len(dds_header()) == 128
    for read in (read_image_size, decode_image):
        with pytest.raises(UnsupportedImageFormatError) as err:
            read(data, source="upload.bin")
        message = str(err.value)
        assert message.startswith("upload.bin: unsupported image format") and "\n" not in message
        assert f"{name}'s" in message and "JPEG, PNG, WEBP, BMP, GIF, TIFF" in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_allowed_format_is_read(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 100, 50)).save(buf, format=fmt)
    assert read_image_size(buf.getvalue()) == (20, 10)
    assert decode_image(buf.getvalue()).size == (20, 10)


def test_any_decoder_exception_is_a_corrupt_image(monkeypatch):
    """Whatever a parser of an allowed format raises — ``NotImplementedError``, ``RuntimeError``,
    ``ZeroDivisionError``, none of them an ``OSError`` — reaches callers as the one error they
    catch, never as the parser's own."""
    from PIL import PngImagePlugin

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for exc in (NotImplementedError("no such mode"), RuntimeError("odd"), ZeroDivisionError("x")):
        def broken(self, exc=exc):
            raise exc
        monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", broken)
        for read in (read_image_size, decode_image):
            with pytest.raises(CorruptImageError, match=f"^x.png: corrupt or not an image \\({type(exc).__name__}"):
                read(png.getvalue(), source="x.png")


@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_serving_refuses_other_formats_as_a_bad_row(name, tmp_path):
    """The pyfunc's checks (MLflow serving, Ray Serve, batch predict, ``instalign predict --image``)
    answer the row's one-line 400 — with batch prediction's reason code — not a stack trace."""
    from pipelines.models import pyfunc
    data = OTHER_FORMATS[name]
    path = tmp_path / f"photo.{name.lower()}"
    path.write_bytes(data)
    calls = {"image_size": lambda: pyfunc.image_size("row 3: 'image' bytes", data),
             "decode_image": lambda: pyfunc.decode_image("row 3: 'image' bytes", data),
             "load_local_image": lambda: pyfunc.load_local_image(path)}
    for call in calls.values():
        with pytest.raises(pyfunc.PyfuncInputError) as err:
            call()
        message = err.value.message
        assert "is not a readable image: unsupported image format" in message and "\n" not in message
        assert message.startswith("row 3: 'image' bytes" if call is not calls["load_local_image"] else f"image '{path}'")
        assert err.value.get_http_status_code() == 400 and err.value.reason == "unsupported_image_format"


def test_serving_reasons_for_corrupt_and_oversized_images():
    from pipelines.models import pyfunc
    for call in (pyfunc.image_size, pyfunc.decode_image):
        with pytest.raises(pyfunc.PyfuncInputError, match=r"^row 0: image is not a readable image: corrupt") as err:
            call("row 0: image", b"\x89PNG\r\n\x1a\n and nothing more")
        assert err.value.reason == "unreadable_image"
    with pytest.raises(pyfunc.PyfuncInputError, match="above the limit") as err:
        pyfunc.image_size("row 0: image", png_header_only(7000, 7000))
    assert err.value.reason == "image_too_large"
