"""The serving boundary of the InstAlign pyfunc: request limits, image paths, concurrency.

Where each limit lives follows from what MLflow 3.17's scoring server
(``mlflow/pyfunc/scoring_server``) does with a request before the model sees it:

* it reads the whole HTTP body (``await request.body()``, no size limit), decodes the JSON and
  the base64 image bytes, and builds the DataFrame — then calls ``predict`` in asyncio's
  default thread pool (``min(32, CPUs + 4)`` threads), so concurrent requests predict
  concurrently;
* a ``MlflowException`` raised by ``predict`` is answered with ``get_http_status_code()``
  (from its ``error_code``: ``INVALID_PARAMETER_VALUE`` → 400, ``TEMPORARILY_UNAVAILABLE`` →
  503, ``RESOURCE_EXHAUSTED`` → 429; no code maps to 413, so :class:`RequestTooLarge`
  overrides the method) and its message, which MLflow prefixes with ``Failed to predict data
  '<the DataFrame's repr>'``; any other exception is a 400 that carries the server's stack
  trace, so every refusal here is an ``MlflowException``;
* its request timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60 s) answers 504 but
  leaves the thread running.

So the model checks, before decoding a single pixel or tokenizing a single text: rows per
request, payload bytes (image bytes, file sizes and texts), and decoded pixels per request
summed over rows (from the image headers) — each over-limit request is a 413 — and each
row's text length in characters (a 400). Then at most ``max_concurrent`` predictions
tokenize, decode and run at once (a semaphore); a request that waits longer than
``queue_timeout_s`` for a slot is a 503. Token counts, decoded images, the model's
activations and the full-size masks — the work that grows with the input — happen only
inside a slot.

What the model cannot bound: the HTTP body is in memory (raw, parsed and base64-decoded)
before ``predict`` runs. Bound its size in front of the server (a reverse proxy's body limit)
and the number of requests in flight with uvicorn's ``UVICORN_LIMIT_CONCURRENCY`` (``mlflow
models serve`` passes its environment on to uvicorn, which then answers 503 to extra
connections without reading their bodies).

``image_path``: the server reads files only under a directory its operator names
(``INSTALIGN_SERVING_IMAGE_ROOT``); otherwise the column is refused. Paths are resolved
(symlinks included) and must stay inside that root and name a regular file; every refusal
has the same message, so a client cannot learn whether a path exists.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Optional

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED, TEMPORARILY_UNAVAILABLE

from instalign.data.images import ImageTooLargeError, NotARegularFileError
from instalign.data.images import read_regular_file as read_capped
from instalign.errors import InstAlignError

log = logging.getLogger(__name__)

#: Refuse any single image above this many pixels (≈ 6000×6000): decoding one takes gigabytes
#: before the model even resizes it to its input side. PIL's own bomb guard is at 89 M.
MAX_PIXELS = 36_000_000

#: Environment variable (read when the model loads) → :class:`ServingLimits` field.
ENV = {
    "max_rows": "INSTALIGN_SERVING_MAX_ROWS",
    "max_text_chars": "INSTALIGN_SERVING_MAX_TEXT_CHARS",
    "max_request_bytes": "INSTALIGN_SERVING_MAX_REQUEST_BYTES",
    "max_pixels": "INSTALIGN_SERVING_MAX_PIXELS",
    "max_concurrent": "INSTALIGN_SERVING_MAX_CONCURRENT",
    "queue_timeout_s": "INSTALIGN_SERVING_QUEUE_TIMEOUT_S",
    "image_root": "INSTALIGN_SERVING_IMAGE_ROOT",
}


# --- errors (all MlflowExceptions: the scoring server answers their status and message) ------

class PyfuncInputError(InstAlignError, MlflowException, ValueError):
    """A request row is invalid; the message names the row and the problem (HTTP 400)."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)


class RequestTooLarge(PyfuncInputError):
    """The request is over a size limit (HTTP 413: no MLflow error code maps to it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=RESOURCE_EXHAUSTED)

    def get_http_status_code(self) -> int:
        return 413


class ServerBusy(InstAlignError, MlflowException):
    """No prediction slot freed up within the queue timeout (HTTP 503: retry later)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


class ServingConfigError(InstAlignError, ValueError):
    """A serving limit set to something unusable; raised when the model loads."""


# --- limits ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServingLimits:
    """What one serving process accepts.

    Defaults fit the paper's use (the model sees 480×480): a full request of 16 such rows is
    3.7 Mpx, and the pixel budget also admits one 12 Mpx phone photo or 16 rows of 1 Mpx. It
    is the knob for memory: the predictor upsamples the merged mask and every kept instance's
    mask (one at a time) to the original size, so one prediction slot needs up to about
    ``max_pixels × (22 + 2·k)`` bytes, k ≤ N the instances kept (docs/security.md).

    Args:
        max_rows: rows per request.
        max_text_chars: characters of one row's ``text``, checked before the tokenizer sees it
            (its time and memory grow with the text: 4 MiB took 8 s and +0.5 GiB). Generous:
            the model reads 20 tokens in the paper, a few dozen words.
        max_request_bytes: image bytes (sent or read from ``image_path``) plus text, per request.
        max_pixels: decoded pixels per request, summed over rows, read from image headers.
        max_concurrent: predictions decoding and running at once in this process.
        queue_timeout_s: how long a request waits for a slot before its 503.
        image_root: the directory ``image_path`` may read from; ``None`` refuses the column.
    """

    max_rows: int = 16
    max_text_chars: int = 2000
    max_request_bytes: int = 32 * 2**20
    max_pixels: int = 16_000_000
    max_concurrent: int = 1
    queue_timeout_s: float = 30.0
    image_root: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_text_chars", "max_request_bytes", "max_pixels", "max_concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServingConfigError(f"serving limit {name} ({ENV[name]}) must be a positive integer, got {value!r}")
        if not isinstance(self.queue_timeout_s, (int, float)) or not 0 <= self.queue_timeout_s < float("inf"):
            raise ServingConfigError(f"serving limit queue_timeout_s ({ENV['queue_timeout_s']}) must be a number of "
                                     f"seconds >= 0, got {self.queue_timeout_s!r}")
        if self.image_root is not None:
            root = os.path.realpath(os.path.expanduser(str(self.image_root)))
            if not os.path.isdir(root):
                raise ServingConfigError(f"image root {self.image_root!r} ({ENV['image_root']}) is not a directory")
            object.__setattr__(self, "image_root", root)

    @classmethod
    def load(cls, model_config: Optional[Mapping[str, Any]] = None,
             environ: Optional[Mapping[str, str]] = None) -> "ServingLimits":
        """Limits from ``model_config`` keys (the field names), else the ``INSTALIGN_SERVING_*``
        environment variables (:data:`ENV`), else the defaults."""
        environ = os.environ if environ is None else environ
        model_config = model_config or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in model_config and model_config[f.name] is not None:
                values[f.name] = model_config[f.name]
                continue
            text = environ.get(ENV[f.name], "").strip()
            if not text:
                continue
            if f.name == "image_root":
                values[f.name] = text
                continue
            try:
                values[f.name] = float(text) if f.name == "queue_timeout_s" else int(text.replace("_", ""))
            except ValueError:
                raise ServingConfigError(f"{ENV[f.name]}={text!r}: expected a number") from None
        return cls(**values)


# --- reading files safely --------------------------------------------------------------------

class FileTooLarge(Exception):
    """A regular file holds more bytes than the caller allows."""

    def __init__(self, path: str, size: int, limit: int) -> None:
        super().__init__(f"{path}: {size} bytes, above the limit of {limit}")
        self.size, self.limit = size, limit


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path`` if it holds at most ``max_bytes``.

    Opened without blocking (a FIFO never hangs the caller) and checked on the open
    descriptor (``fstat``), so what is checked is what is read; ``/dev/zero``, a FIFO or a
    directory is refused before a byte is read.

    Raises:
        OSError: missing (``FileNotFoundError``), unreadable, or not a regular file.
        FileTooLarge: more than ``max_bytes``.
    """
    try:
        return read_capped(path, max_bytes=max_bytes)
    except ImageTooLargeError as e:
        raise FileTooLarge(path, getattr(e, "size", max_bytes + 1), max_bytes) from None
    except NotARegularFileError:
        raise OSError("not a regular file") from None


def read_served_image_path(row: int, value: Any, *, root: Optional[str], max_bytes: int) -> bytes:
    """Row ``row``'s ``image_path`` read under ``root``; refusals never say whether it exists.

    A relative path is taken relative to ``root``; an absolute one must lie inside it. The
    path is resolved with ``realpath`` first, so ``..`` and symlinks that lead out of the
    root are refused like any other path outside it. ``max_bytes``: what is left of the
    request's payload limit.
    """
    if root is None:
        raise PyfuncInputError(f"row {row}: this server does not read 'image_path' (send the image bytes in the "
                               f"'image' column; its operator can allow paths under one directory with "
                               f"{ENV['image_root']})")
    try:
        resolved = os.path.realpath(os.path.join(root, str(value)))
        if os.path.commonpath([resolved, root]) == root:
            return read_regular_file(resolved, max_bytes)
    except FileTooLarge as e:  # a regular file inside the root: its size is no secret
        raise RequestTooLarge(f"row {row}: image_path {str(value)!r} is {e.size} bytes, more than the "
                              f"{max_bytes} bytes left of the request's payload limit ({ENV['max_request_bytes']})"
                              ) from None
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        pass
    raise PyfuncInputError(f"row {row}: image_path {str(value)!r} is not a readable image file under the server's "
                           f"image root")


# --- concurrency -----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand the heap memory a finished prediction freed back to the OS (glibc ``malloc_trim``).

    Decoded images and full-size masks are freed after each request, but glibc keeps freed
    heap pages (one arena per thread, and the scoring server's pool has many threads), so
    without this the process's resident memory ratchets up to the worst request each thread
    has seen. A no-op where the C library has no ``malloc_trim`` (musl, macOS).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PredictionGate:
    """At most ``slots`` predictions at once; a caller waits up to ``timeout_s`` for a slot."""

    def __init__(self, slots: int, timeout_s: float) -> None:
        self.slots = slots
        self.timeout_s = timeout_s
        self._sem = threading.BoundedSemaphore(slots)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._sem.acquire(timeout=self.timeout_s):
            log.warning("prediction refused: %d prediction(s) still running after %.1f s", self.slots, self.timeout_s)
            raise ServerBusy(f"the server is busy: {self.slots} prediction(s) running and no slot freed up within "
                             f"{self.timeout_s:g} s; retry later ({ENV['max_concurrent']} sets how many run at once)")
        try:
            yield
        finally:
            self._sem.release()
            release_free_memory()


__all__ = ["MAX_PIXELS", "ENV", "PyfuncInputError", "RequestTooLarge", "ServerBusy", "ServingConfigError",
           "ServingLimits", "PredictionGate", "FileTooLarge", "read_regular_file",
           "read_served_image_path", "release_free_memory"]
