"""Whole or not at all: directories written to be read later carry a list of their files.

Everything InstAlign writes for a later reader — the tiny text encoder in the cache, a
registry model downloaded into the cache, a checkpoint — is a directory of several files,
and a directory can be seen half-written: a process killed mid-write, a rank that wrote
only some of the files, or a copy (Ray's storage upload, MLflow artifacts, rsync) that
moves files in any order. "Write one file last" proves completeness only on the disk it
was written on. So, as a distributed checkpoint's metadata file does, the writer ends by
**sealing** the directory: :data:`SEAL_FILE` lists every file with its size and SHA-256,
and it is written last, atomically. A reader :func:`verify`-es the seal — every listed
file present, with its size and digest — wherever the directory travelled. A missing or
damaged file is named in the error; a cache that fails verification is rebuilt
(:func:`build_once`), never trusted.

:func:`build_once` is the one way to fill a cache entry: under an exclusive file lock
(concurrent processes — DDP ranks, two ``predict`` calls — wait and share one build), it
builds into a temporary sibling, seals it, checks it, and renames it into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

from instalign.errors import InstAlignError

log = logging.getLogger(__name__)

SEAL_FILE = "_SEALED.json"
SEAL_FORMAT = "instalign-sealed-dir/1"
_CHUNK = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]


class IntegrityError(InstAlignError, OSError):
    """A sealed directory is incomplete or damaged; ``file`` names the first bad file."""

    def __init__(self, directory: PathLike, file: str, problem: str) -> None:
        self.directory, self.file, self.problem = str(directory), file, problem
        super().__init__(f"{directory}: {file}: {problem}")


def sha256_file(path: PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listing(directory: Path) -> list[str]:
    """Every regular file below ``directory`` (relative POSIX paths), the seal excepted."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel != SEAL_FILE and not name.startswith(f".{SEAL_FILE}."):
                files.append(rel)
    return files


def seal(directory: PathLike, *, kind: str, meta: Optional[dict[str, Any]] = None,
         files: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """List ``files`` (default: every file below ``directory``) with size and digest; write last.

    Returns the seal's content. Any earlier seal is replaced atomically.
    """
    directory = Path(directory)
    names = sorted(files) if files is not None else _listing(directory)
    listing = {}
    for rel in names:
        path = directory / rel
        listing[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    content = {"format": SEAL_FORMAT, "kind": kind, "sealed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "files": listing, "meta": dict(meta or {})}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{SEAL_FILE}.")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / SEAL_FILE)
    return content


def unseal(directory: PathLike) -> None:
    """Remove the seal first when rewriting a directory in place: it is incomplete until resealed."""
    (Path(directory) / SEAL_FILE).unlink(missing_ok=True)


def verify(directory: PathLike, *, kind: Optional[str] = None, required: Iterable[str] = (),
           digests: bool = True) -> dict[str, Any]:
    """Check ``directory`` against its seal; return the seal's content.

    Args:
        kind: the expected ``kind`` (e.g. ``"checkpoint"``), when known.
        required: files that must be listed (a writer of another version could have
            sealed a directory without them).
        digests: also recompute every SHA-256 (sizes alone catch truncation, not corruption).

    Raises:
        IntegrityError: naming the directory and the first missing, truncated or altered file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IntegrityError(directory, ".", "not a directory")
    seal_path = directory / SEAL_FILE
    try:
        content = json.loads(seal_path.read_text())
    except FileNotFoundError:
        raise IntegrityError(directory, SEAL_FILE, "missing: the directory was not written completely, or was "
                                                   "copied partially (or by an older InstAlign)") from None
    except (OSError, ValueError) as e:
        raise IntegrityError(directory, SEAL_FILE, f"unreadable ({e})") from None
    if not isinstance(content, dict) or content.get("format") != SEAL_FORMAT or \
            not isinstance(content.get("files"), dict):
        raise IntegrityError(directory, SEAL_FILE, f"not an InstAlign seal (format {SEAL_FORMAT!r} expected)")
    if kind is not None and content.get("kind") != kind:
        raise IntegrityError(directory, SEAL_FILE, f"sealed as a {content.get('kind')!r}, not a {kind!r}")
    listing: dict[str, dict] = content["files"]
    for rel in required:
        if rel not in listing:
            raise IntegrityError(directory, rel, "missing (not listed in the seal)")
    for rel, entry in listing.items():
        path = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IntegrityError(directory, rel, "listed outside the directory")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(directory, rel, "missing") from None
        if size != entry.get("size"):
            raise IntegrityError(directory, rel, f"{size} bytes, the seal says {entry.get('size')} (truncated or "
                                                 "partly copied)")
        if digests and sha256_file(path) != entry.get("sha256"):
            raise IntegrityError(directory, rel, "content differs from the seal's SHA-256 (damaged or altered)")
    return content


def is_sealed(directory: PathLike, **kwargs: Any) -> bool:
    """Whether :func:`verify` passes."""
    try:
        verify(directory, **kwargs)
        return True
    except IntegrityError:
        return False


@contextlib.contextmanager
def exclusive(lock_path: PathLike) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path`` (created if needed), held for the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish(tmp: PathLike, final: PathLike) -> Path:
    """Rename the sealed directory ``tmp`` to ``final``, replacing whatever is there.

    The old content is first renamed aside, so a reader sees the old directory, nothing, or
    the new one — never a mixture.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    return final


def build_once(final: PathLike, build: Callable[[Path], Any], *, kind: str, meta: Optional[dict[str, Any]] = None,
               required: Iterable[str] = (), digests: bool = True, sealed_by_build: bool = False) -> Path:
    """Return ``final`` if it verifies; otherwise build it (once, whoever else is asking).

    ``build(tmp)`` writes the content into an empty temporary sibling directory; it is then
    sealed, verified and renamed into place under an exclusive lock, so concurrent callers
    in other processes wait and reuse one build. A damaged ``final``, or one whose seal's
    ``meta`` differs from ``meta`` (an older recipe), is rebuilt with a warning naming what
    was wrong. Whatever ``torch.distributed`` state the caller is in,
    the process that builds writes every file itself.

    ``sealed_by_build``: the content arrives with its own seal (a download of a sealed
    directory); it is verified in full, digests included, instead of being sealed here — a
    fresh seal would bless whatever the transfer delivered. ``digests`` then applies to the
    check of an existing entry only.
    """
    final = Path(final)
    required = list(required)

    def check() -> Optional[IntegrityError]:
        try:
            content = verify(final, kind=kind, required=required, digests=digests)
        except IntegrityError as e:
            return e
        stale = {k: content["meta"].get(k) for k, v in (meta or {}).items() if content["meta"].get(k) != v}
        return IntegrityError(final, SEAL_FILE, f"stale: built with {stale}, wanted {meta}") if stale else None

    if check() is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent / f".{final.name}.lock"):
        reason = check()  # someone else may have built it while we waited for the lock
        if reason is None:
            return final
        if final.exists():
            log.warning("rebuilding %s: %s", final, reason.problem if reason.file == "." else f"{reason.file}: "
                        f"{reason.problem}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            if sealed_by_build:
                verify(tmp, kind=kind, required=required, digests=True)
            else:
                seal(tmp, kind=kind, meta=meta)
                verify(tmp, kind=kind, required=required, digests=False)
            publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["SEAL_FILE", "IntegrityError", "seal", "unseal", "verify", "is_sealed", "exclusive", "publish",
           "build_once", "sha256_file"]
