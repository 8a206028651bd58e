"""A restricted unpickler for the REFER-family annotation pickles (DESIGN §3).

Ref-ZOM (``refs(final).p``) and classic RefCOCO/+/g (``refs(unc).p``, ``refs(umd).p``) ship
their refs as pickles, and a pickle can name any importable callable and call it while
loading (``os.system``, ``eval``, ``subprocess.Popen`` …). ``pickle.load`` on a downloaded
file is therefore code execution. These files only ever hold plain data — a list of dicts
of ints, strings and lists — so this unpickler admits the opcodes that build containers and
scalars and refuses every global except a short allow-list:

* ``set`` / ``frozenset`` (protocol 2 pickles them as ``__builtin__.set([...])``);
* ``_codecs.encode(text, "latin1")``, which Python 3 uses to pickle ``bytes`` at protocol 2
  (replaced here by a function that accepts exactly that call and nothing else);
* NumPy *scalars* (``numpy.int64(5)``: ``numpy[._]core.multiarray.scalar`` + ``numpy.dtype``)
  for numeric kinds only, returned as Python scalars. The original REFER pickles do not need
  them; they are admitted because re-saved copies of these files commonly carry NumPy ids.
  NumPy *arrays* (``_reconstruct``) stay refused: object arrays can smuggle code.

Refusal happens when the ``GLOBAL``/``STACK_GLOBAL`` opcode is read, before any call, so a
hostile file has no effect beyond raising :class:`UnsafePickleError`, which names the file
and the refused global.

Python 2 ``str`` objects (the UNC pickles were written by Python 2) are decoded as UTF-8, of
which ASCII is a subset; invalid UTF-8 falls back to Latin-1 (every byte sequence decodes)
with a warning rather than failing a whole release on one odd sentence.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
from typing import Any, Callable

import numpy as np

from instalign.errors import InstAlignError

logger = logging.getLogger(__name__)

__all__ = ["UnsafePickleError", "PickleReadError", "safe_load", "safe_loads"]


class UnsafePickleError(InstAlignError, pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it was *not* executed)."""


class PickleReadError(InstAlignError, ValueError):
    """The file is not a readable pickle (truncated, corrupt, not a pickle)."""


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 pickles ``bytes`` at protocol 2 as ``_codecs.encode(text, "latin1")``.
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode called with ({type(text).__name__}, {encoding!r}); "
                                "only (str, 'latin1') is admitted")
    return text.encode("latin1")


_NUMERIC_KINDS = frozenset("biuf")


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    # ``numpy.dtype("i8", False, True)`` followed by BUILD → dtype.__setstate__ (C, data only).
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy.dtype called with {type(spec).__name__}; only a type string is admitted")
    dtype = np.dtype(spec)
    if dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(f"numpy.dtype({spec!r}) refused: only bool/int/uint/float scalars are admitted")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.hasobject:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} refused: only numeric scalars are admitted")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar payload must be {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)[0].item()


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # Python 2 names (protocol ≤ 2)
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, *, source: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to load global '{module}.{name}' — annotation pickles may only "
                "contain plain containers and scalars (dict, list, tuple, set, str, bytes, int, float, bool, "
                "None); nothing in the file was executed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused persistent id {pid!r}")


#: Opcodes that store into the memo at an index the file chooses.
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
#: What may come out of a pickle (the NumPy helpers above return Python scalars).
_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, int, float, bool, type(None))


def _check_opcodes(data: bytes, source: str) -> None:
    """Walk the opcodes without running them (``pickletools.genops``) and refuse a memo index
    that no pickler writes.

    CPython's unpickler keeps its memo in an array sized to the largest index stored, zeroed:
    a 10-byte file storing at index 2**31 (``LONG_BINPUT``) makes it allocate and touch 16 GiB
    (measured: index 2**28 → 4 GiB resident). A pickler numbers its memo entries in order, so
    an index is never larger than the opcodes before it; that bounds the memo by the file.
    """
    try:
        for n, (opcode, arg, pos) in enumerate(pickletools.genops(data)):
            if opcode.name in _MEMO_PUTS and isinstance(arg, int) and not 0 <= arg <= n:
                raise UnsafePickleError(f"{source}: memo index {arg} at byte {pos} (opcode {opcode.name}) is beyond "
                                        f"what the {n} opcodes before it could have stored; nothing in the file "
                                        "was executed")
    except UnsafePickleError:
        raise
    except UnicodeDecodeError as exc:  # a Python 2 str is read as Latin-1 here: this is text pickle reads as UTF-8
        raise PickleReadError(f"{source}: not a readable pickle (text that is not UTF-8: {exc})") from exc
    except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as exc:
        raise PickleReadError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _first_not_plain(value: Any) -> str | None:
    """The first object in ``value`` that is not plain data (iterative: a pickle can nest deeply)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if type(v) not in _PLAIN:
            return f"{type(v).__module__}.{type(v).__name__}"
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack += v
    return None


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` admitting only plain data; ``source`` names it in errors.

    Three checks: the opcodes are walked first (:func:`_check_opcodes`: the memo a file may
    ask for), globals outside the allow-list are refused as they are read, and what comes out
    must be plain data (a ``numpy.dtype`` left outside a NumPy scalar is refused).
    """
    _check_opcodes(data, source)
    obj = _load(data, source)
    stray = _first_not_plain(obj)
    if stray is not None:
        raise UnsafePickleError(f"{source}: a {stray} came out of the pickle; only plain containers and scalars are "
                                "admitted (nothing in the file was executed)")
    return obj


def _load(data: bytes, source: str) -> Any:
    for encoding in ("utf-8", "latin1"):
        try:
            obj = _RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
        except UnsafePickleError as exc:
            if str(exc).startswith(source):
                raise
            raise UnsafePickleError(f"{source}: {exc}; nothing in the file was executed") from None
        except UnicodeDecodeError as exc:
            if encoding == "utf-8":
                # A Python 2 str that is not UTF-8: Latin-1 decodes any byte string.
                logger.warning("%s: Python 2 strings are not valid UTF-8; decoding them as Latin-1", source)
                continue
            # Still undecodable: text that pickle always reads as UTF-8 (a protocol-2+ unicode
            # string, a module name), whatever the encoding asked for Python 2 strings.
            raise PickleReadError(f"{source}: not a readable pickle (text that is not UTF-8: {exc})") from exc
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, MemoryError, OverflowError) as exc:
            raise PickleReadError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
        return obj
    raise AssertionError("unreachable: the Latin-1 pass returns or raises")


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Read and unpickle the file at ``path`` with :func:`safe_loads`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return safe_loads(data, source=path)
