"""``instalign prepare``, output location: where a dataset is built and how it replaces an old one.

``--out`` is a local path or a URI (:func:`resolve_output`). An existing dataset is never
mixed with (:func:`check_output`) nor destroyed before its replacement is complete: the new
one is built in a hidden sibling (:func:`sibling_path`) and swapped in
(:func:`replace_output`). ``_manifest.json`` is written last and atomically
(:func:`write_manifest`): no manifest ⇔ not a finished dataset. Only a dataset may be
replaced (:func:`check_output`, by ``pipelines.core.output_dirs``'s rule): never ``--root`` or a
directory above it, only a directory holding a manifest or the marker every build writes first
(``output_dirs.claim_output``), and nothing in it but a dataset's files (:func:`owns`).
"""

from __future__ import annotations

import json
import os
import re
import uuid

import pyarrow.fs as pafs

from instalign.data.release_checks import is_safe_split_name
from instalign.data.records import MANIFEST_NAME, QUARANTINE_DIR
from pipelines.core.output_dirs import MARKER_NAME, replaceable_output
from pipelines.data.records import PrepareError


def resolve_output(out: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (s3://, gs://, file://) → (pyarrow filesystem, path in it)."""
    if "://" in str(out):
        return pafs.FileSystem.from_uri(str(out))
    return pafs.LocalFileSystem(), os.path.abspath(str(out))


#: ``.<manifest>.<hex>.tmp``: :func:`write_manifest`'s temporary name.
_TMP_MANIFEST = re.compile(rf"\.{re.escape(MANIFEST_NAME)}\.[0-9a-f]+\.tmp")
#: ``<split>/`` and ``<split>/<split>-NNNNN.parquet`` (``prepare_shards.shard_file_name``).
_SHARD = re.compile(r"(?P<split>[^/]+)/(?:(?P=split)-\d{5}\.parquet)?")


def owns(rel: str) -> bool:
    """Whether ``rel`` (relative to ``--out``; a directory ends with ``/``) is part of a prepared dataset."""
    if rel in (MANIFEST_NAME, MARKER_NAME, f"{QUARANTINE_DIR}/", f"{QUARANTINE_DIR}/quarantine.parquet"):
        return True
    shard = _SHARD.fullmatch(rel)
    return bool(_TMP_MANIFEST.fullmatch(rel) or (shard and is_safe_split_name(shard["split"])))


def check_output(fs: pafs.FileSystem, path: str, *, overwrite: bool, root: str | None = None) -> bool:
    """Refuse to mix with an existing dataset unless ``overwrite``, and to replace anything but one.

    Returns whether ``path`` holds something that a finished prepare must *replace*; nothing
    is deleted here (``overwrite`` builds beside it, see :func:`replace_output`). What may be
    replaced is ``pipelines.core.output_dirs``'s rule: never ``root`` nor a directory above it,
    only a directory this project wrote (a manifest, or the marker
    ``output_dirs.claim_output`` writes first) holding nothing but a dataset's files.
    """
    if not replaceable_output(fs, path, owns=owns, inputs=[root] if root else [], error=PrepareError):
        return False
    if not overwrite:
        present = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        what = "a finished dataset (_manifest.json)" if any(p.base_name == MANIFEST_NAME for p in present) \
            else f"{len(present)} file(s) from an earlier (possibly interrupted) run"
        raise PrepareError(f"output {path} already holds {what}; pass --overwrite (overwrite=True) to replace it")
    return True


def sibling_path(path: str, tag: str) -> str:
    """``<parent>/.<name>.<tag>-<hex>``: a hidden neighbour of ``path`` on the same filesystem
    (so that a local swap is a rename, never a copy across devices)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if not parent or not name:
        raise PrepareError(f"output {path} has no parent to build a replacement beside; use a sub-directory")
    return f"{parent}/.{name}.{tag}-{uuid.uuid4().hex[:12]}"


def _copy_tree_manifest_last(fs: pafs.FileSystem, src: str, dst: str) -> None:
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.type == pafs.FileType.File]
    for f in sorted(files, key=lambda p: p.rsplit("/", 1)[-1] == MANIFEST_NAME):  # the manifest goes last
        target = dst + f[len(src):]
        fs.create_dir(target.rpartition("/")[0], recursive=True)
        fs.copy_file(f, target)


def replace_output(fs: pafs.FileSystem, built: str, path: str) -> None:
    """Put the finished dataset at ``built`` in place of the old one at ``path``.

    Local filesystems: rename the old one aside, rename the new one in (rolled back if that
    fails), delete the old one. Object stores (no rename): delete the old prefix, copy the new
    one in with the manifest last — an interruption there leaves ``path`` without a manifest
    (an unfinished dataset, by definition) and the complete build at ``built``, which the
    error names.
    """
    if fs.type_name == "local":
        old = sibling_path(path, "replaced")
        fs.move(path, old)
        try:
            fs.move(built, path)
        except BaseException:
            fs.move(old, path)
            raise
        fs.delete_dir(old)
        return
    fs.delete_dir(path)
    try:
        _copy_tree_manifest_last(fs, built, path)
    except Exception as e:
        raise PrepareError(f"replacing {path}: copying the new dataset in failed ({type(e).__name__}: {e}); the "
                           f"complete new dataset is at {built}, the old one is gone") from e
    fs.delete_dir(built)


def write_manifest(fs: pafs.FileSystem, path: str, manifest: dict) -> None:
    """Write ``_manifest.json`` atomically: a temporary name renamed into place (local);
    a single object PUT on object stores, which is atomic there."""
    text = json.dumps(manifest, indent=2, sort_keys=False).encode()
    final = f"{path}/{MANIFEST_NAME}"
    if fs.type_name != "local":
        with fs.open_output_stream(final) as f:
            f.write(text)
        return
    tmp = f"{path}/.{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(text)
        fs.move(tmp, final)  # os.rename: atomic on POSIX
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
