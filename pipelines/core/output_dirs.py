"""Which output directories a verb may replace: the one rule of every ``--out`` (and work dir).

A verb that replaces an output (``instalign prepare --overwrite``, ``instalign predict
--data … --out``, ``instalign bench data --work-dir``) deletes what was there. So it may
replace only a directory that this project wrote, and nothing the user keeps beside or
inside it (:func:`replaceable_output`):

* never the input it reads, nor a directory above it (``--root D/raw --out D``), compared
  after resolving symlinks — the old output is deleted once the new one is in place;
* never the home directory or one above it;
* only a directory that carries this project's mark: a finished dataset's ``_manifest.json``
  or :data:`MARKER_NAME`, which :func:`claim_output` writes *first*, before any other file, so
  that a run interrupted before its manifest still left a directory that may be replaced;
* and in it, only entries of the verb's own layout (its ``owns`` predicate): a ``notes.txt``
  or a ``raw/`` put inside an old output is named in the refusal, never deleted.

A verb's single output file (``--json PATH``, ``predict --out overlay.png``) follows the same
idea (:func:`replaceable_file`): replaced only when it already holds what the verb writes.

Local paths and object stores (``s3://``, ``gs://``) go through the same pyarrow filesystem
calls; the symlink and home checks apply to local paths only (nothing to resolve in a bucket).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import pyarrow.fs as pafs

from instalign.data.records import MANIFEST_NAME
from instalign.errors import InstAlignError

#: Written first into every output directory a verb creates; its presence (or a manifest's)
#: is what makes a directory replaceable.
MARKER_NAME = ".instalign-output"
_MARKER_TEXT = b"Written by instalign; a later run with --overwrite may replace this directory.\n"


class OutputRefused(InstAlignError, ValueError):
    """The output location may not be (re)placed; the message says what was found there."""


def _is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def _refuse_overlap(path: str, inputs: Iterable[str], error: type[Exception]) -> None:
    """Refuse a local ``path`` that is, or lies above, an input or the home directory (symlinks resolved)."""
    real = os.path.realpath(path)
    above = os.path.join(real, "")
    for given in inputs:
        if not given or "://" in str(given):
            continue
        target = os.path.realpath(str(given))
        if target == real or target.startswith(above):
            how = "is" if target == real else "is a directory above"
            raise error(f"output {path} {how} the input {given} (resolved: {target}); replacing it would delete "
                        f"what is being read: choose an output outside the input")
    home = os.path.realpath(os.path.expanduser("~"))
    if home != os.sep and (home == real or home.startswith(above)):
        raise error(f"output {path} is {'the' if home == real else 'above the'} home directory {home}; "
                    f"refusing to replace it: choose a new sub-directory")


def _shown(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _foreign_entries(fs: pafs.FileSystem, path: str, top: list[pafs.FileInfo],
                     owns: Callable[[str], bool]) -> list[str]:
    """Top-level names (directories with a trailing ``/``) holding anything outside the verb's layout.

    ``owns`` is asked about paths relative to ``path``: files as ``a/b.parquet``, directories as
    ``a/``. A directory is listed only once its name is owned (a foreign tree is never walked).
    """
    foreign = []
    prefix = len(path.rstrip("/")) + 1
    for info in top:
        name = info.base_name
        if info.type != pafs.FileType.Directory:
            if info.type != pafs.FileType.File or not owns(name):
                foreign.append(name)
            continue
        if not owns(f"{name}/"):
            foreign.append(f"{name}/")
            continue
        for below in fs.get_file_info(pafs.FileSelector(info.path, recursive=True)):
            rel = below.path[prefix:]
            is_dir = below.type == pafs.FileType.Directory
            if (not is_dir and below.type != pafs.FileType.File) or not owns(f"{rel}/" if is_dir else rel):
                foreign.append(f"{name}/")
                break
    return sorted(foreign)


def replaceable_output(fs: pafs.FileSystem, path: str, *, owns: Callable[[str], bool], inputs: Iterable[str] = (),
                       error: type[Exception] = OutputRefused) -> bool:
    """Raise ``error`` unless ``path`` may be written (absent or empty) or replaced (an earlier output of ours).

    Returns whether ``path`` holds an earlier output; the verb decides whether to replace it
    (``--overwrite``) or to refuse. ``owns(rel)`` says whether a relative path belongs to the
    verb's layout (see :func:`_foreign_entries`); ``inputs`` are the local paths the verb reads.
    """
    if _is_local(fs):
        _refuse_overlap(path, inputs, error)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type != pafs.FileType.Directory:
        raise error(f"output {path} exists and is not a directory")
    top = fs.get_file_info(pafs.FileSelector(path))
    if not top:
        return False
    names = {i.base_name for i in top}
    if not names & {MARKER_NAME, MANIFEST_NAME}:
        shown = sorted(f"{i.base_name}/" if i.type == pafs.FileType.Directory else i.base_name for i in top)
        raise error(f"output {path} is not an empty directory: it holds {len(shown)} "
                    f"entr{'y' if len(shown) == 1 else 'ies'} this project did not write ({_shown(shown)}) and "
                    f"neither {MANIFEST_NAME} nor {MARKER_NAME}; refusing to replace it")
    foreign = _foreign_entries(fs, path, top, owns)
    if foreign:
        one = len(foreign) == 1
        raise error(f"output {path} holds {len(foreign)} entr{'y' if one else 'ies'} this project did not write "
                    f"({_shown(foreign)}); refusing to replace it: move {'it' if one else 'them'} out or choose "
                    f"another output")
    return True


def looks_like_json(head: bytes) -> bool:
    """A JSON document (what the ``--json`` reports write): its first non-blank byte opens an object or a list."""
    return head.lstrip()[:1] in (b"{", b"[")


def looks_like_image(head: bytes) -> bool:
    """An image file (what ``predict --out`` writes): Pillow recognises its header."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(head)):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def replaceable_file(path: str, *, kind: str, looks_ours: Callable[[bytes], bool], inputs: Iterable[str] = (),
                     error: type[Exception] = OutputRefused) -> None:
    """The rule for a verb's single output file (``--json``, an overlay): raise ``error`` unless
    ``path`` is new or already holds ``kind`` (``looks_ours`` of its first 64 KiB), and is none
    of ``inputs`` (symlinks resolved): never a user's notes, a directory, a FIFO or the image read."""
    real = os.path.realpath(path)
    for given in inputs:
        if given and os.path.realpath(str(given)) == real:
            raise error(f"output {path} is the input {given}; choose another output file")
    if not os.path.lexists(path):
        return
    if not os.path.isfile(path):
        raise error(f"output {path} exists and is not a regular file; refusing to replace it")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head and not looks_ours(head):
        raise error(f"output {path} exists and is not {kind}; refusing to replace a file this project did not "
                    f"write: choose another output file")


def check_report_path(path: str | None) -> None:
    """``--json PATH`` of the benchmarks: checked before the (long) measurement, replaced only if a JSON report."""
    if path:
        replaceable_file(path, kind="a JSON report", looks_ours=looks_like_json)


def claim_output(fs: pafs.FileSystem, path: str) -> None:
    """Create ``path`` and write :data:`MARKER_NAME` into it, before anything else is written there."""
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{MARKER_NAME}") as f:
        f.write(_MARKER_TEXT)
