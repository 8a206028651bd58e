"""Batch prediction's decode stage (``pipelines.inference.batch``): rows in, pixels out, on CPUs.

:func:`decode_rows` runs as plain Ray Data tasks ahead of the model's actor pool
(``pipelines.inference.actor``), so the model's process — a GPU's feeder, or the one CPU it
is given — spends no time reading files and decoding images. Every row is checked with the
serving boundary's own functions (``pipelines.models.pyfunc``: ``check_text_size``,
``image_size``, ``decode_image``; files capped at ``pyfunc.MAX_FILE_BYTES`` like
``instalign predict --image``); a row that fails is kept, marked rejected with a reason code
and its message, and travels on to ``rejects/``: a bad row never fails the job and is never
dropped. The token count of the text needs the model's tokenizer and is checked in the
model stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.inference.tables import DECODED_SCHEMA
from pipelines.models.limits import FileTooLarge, read_regular_file
from pipelines.models.pyfunc import MAX_FILE_BYTES, PyfuncInputError, check_text_size, decode_image, image_size


class Rejected(Exception):
    """A row that cannot be predicted: ``reason`` (a short code) and ``detail`` (the message)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def text_rejected(row_id: str, text: Any, error: PyfuncInputError) -> Rejected:
    """A text check's refusal as a reject: ``empty_text`` or ``text_too_long`` (as before the stages split)."""
    empty = not isinstance(text, str) or not text.strip()
    return Rejected("empty_text" if empty else "text_too_long", str(error))


def read_image_file(what: str, path: str) -> bytes:
    """A local file or a ``pyarrow.fs`` URI, at most ``pyfunc.MAX_FILE_BYTES`` (regular files only)."""
    try:
        if "://" not in path or path.startswith("file://"):
            return read_regular_file(path.removeprefix("file://"), MAX_FILE_BYTES)
        fs, inner = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        if info.type != pafs.FileType.File:
            raise OSError("not a regular file")
        if info.size is not None and info.size > MAX_FILE_BYTES:
            raise FileTooLarge(path, info.size, MAX_FILE_BYTES)
        with fs.open_input_stream(inner) as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise FileTooLarge(path, len(data), MAX_FILE_BYTES)
        return data
    except FileNotFoundError:
        raise Rejected("missing_image", f"{what} does not exist") from None
    except FileTooLarge as e:
        raise Rejected("image_too_large", f"{what} is {e.size} bytes, above the limit of {e.limit}") from None
    except (OSError, pa.ArrowException, ValueError) as e:
        raise Rejected("unreadable_image", f"{what} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    except PyfuncInputError as e:  # pragma: no cover - read_regular_file raises none today
        raise Rejected("unreadable_image", str(e)) from None


def decode_row(row: dict[str, Any]) -> np.ndarray:
    """A row's image as ``(h, w, 3)`` uint8 RGB; raises :class:`Rejected` with the first problem
    found, the text's size before the image (the order the serving boundary checks in)."""
    what = f"row {row['row_id']}"
    try:
        check_text_size(row["row_id"], row["text"])
    except PyfuncInputError as e:
        raise text_rejected(row["row_id"], row["text"], e) from None
    if row["image"]:
        data, what = row["image"], f"{what}: image bytes"
    elif row["image_path"]:
        what = f"{what}: image_path {row['image_path']!r}"
        data = read_image_file(what, row["image_path"])
    else:
        raise Rejected("missing_image", f"{what}: no image bytes and no image_path")
    try:
        image_size(what, data)
        return np.asarray(decode_image(what, data), dtype=np.uint8)
    except PyfuncInputError as e:  # its reason: unsupported_image_format, image_too_large, unreadable_image
        raise Rejected(getattr(e, "reason", "unreadable_image"), str(e)) from None


def decode_rows(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: :data:`~pipelines.inference.tables.INPUT_SCHEMA` rows in,
    :data:`~pipelines.inference.tables.DECODED_SCHEMA` rows out, one for one, in order."""
    out = []
    for row in batch.to_pylist():
        pair = {k: row[k] for k in ("row_id", "image_path", "text", "gt_mask", "gt_no_target", "gt_num_targets")}
        try:
            pixels = decode_row(row)
        except Rejected as e:
            out.append({**pair, "status": "rejected", "reason": e.reason, "detail": e.detail})
            continue
        h, w = pixels.shape[:2]
        out.append({**pair, "pixels": pixels.tobytes(), "width": w, "height": h, "status": "ok"})
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)
