"""Where a release's files are on disk, how they are opened, and their checksums.

:func:`locate_release` finds the refs file, ``instances.json`` and the image folder of one
dataset under ``--root`` (default layouts in ``instalign.data.readers``' docstring) and
checks they are regular files, without reading them: ``prepare`` calls it first, so a wrong
``--root`` is refused at once. :func:`load_json` and :func:`load_refs` open them so that any
malformed file ends in a :class:`~instalign.data.release_checks.SourceFormatError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from instalign.data.release_checks import SourceFormatError
from instalign.data.safe_pickle import PickleReadError, safe_load

__all__ = ["DATASETS", "REFCOCO_SPLIT_BYS", "COCO_TRAIN2014", "ReleaseFiles", "locate_release", "load_json",
           "load_refs", "release_checksums"]

DATASETS = ("grefcoco", "refzom", "refcoco", "refcoco+", "refcocog")
REFCOCO_SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
COCO_TRAIN2014 = "COCO_train2014_{:012d}.jpg"

#: Per dataset: its folder under the root, its refs file name (``{split_by}`` filled in) and its image folder.
_LAYOUT = {
    "grefcoco": ("grefcoco", "grefs({split_by}).json", "train2014"),
    "refzom": ("ref-zom", "refs(final).p", "trainval2014"),
    **{name: (name, "refs({split_by}).p", "train2014") for name in REFCOCO_SPLIT_BYS},
}
_TITLE = {"grefcoco": "gRefCOCO", "refzom": "Ref-ZOM"}


@dataclasses.dataclass(frozen=True)
class ReleaseFiles:
    """Where one release's annotation files and images are: located and checked to be
    regular files, not yet read (:func:`locate_release`)."""

    dataset: str
    root: Path
    refs: Path
    instances: Path
    images: Path


def locate_release(dataset: str, root: str | os.PathLike[str], *, split_by: str | None = None,
                   refs_file: str | os.PathLike[str] | None = None,
                   instances_file: str | os.PathLike[str] | None = None,
                   image_dir: str | os.PathLike[str] | None = None) -> ReleaseFiles:
    """The release's files under ``root`` (or where the overrides point), without reading them.

    Cheap (a few ``stat`` calls): ``prepare`` calls it before anything else, so that a wrong
    ``--root`` is refused at once; parsing the files is the expensive part.

    Raises:
        FileNotFoundError: a file is missing (the message names the override that points at it).
        SourceFormatError: a file is a directory, FIFO or device.
        ValueError: an unknown dataset, or a split scheme the dataset is not released in.
    """
    if dataset not in _LAYOUT:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if dataset == "grefcoco":
        split_by = split_by or "unc"
    elif dataset in REFCOCO_SPLIT_BYS:
        split_by = split_by or REFCOCO_SPLIT_BYS[dataset][0]
        if split_by not in REFCOCO_SPLIT_BYS[dataset]:
            raise ValueError(f"{dataset} is released split by {REFCOCO_SPLIT_BYS[dataset]}, not {split_by!r}")
    root = Path(root)
    folder, refs_name, images = _LAYOUT[dataset]
    if refs_file is None:
        refs_file = root / folder / refs_name.format(split_by=split_by)
        pickle_path = refs_file.with_suffix(".p")
        if dataset == "grefcoco" and not refs_file.is_file() and pickle_path.is_file():
            refs_file = pickle_path  # gRefCOCO's refs come as JSON, or as the pickle of older copies
    title = _TITLE.get(dataset, dataset)
    return ReleaseFiles(
        dataset=dataset, root=root,
        refs=_require_file(Path(refs_file), f"{title} refs file", "refs_file"),
        instances=_require_file(Path(instances_file or root / folder / "instances.json"), f"{title} instances file",
                                "instances_file"),
        images=Path(image_dir or root / "images" / images))


def _require_file(path: Path, what: str, override: str) -> Path:
    if not path.is_file():  # follows symlinks: a link to /dev/zero or a FIFO is refused here, unread
        if path.exists():
            raise SourceFormatError(f"{what} {path} is not a regular file (a directory, FIFO or device)")
        raise FileNotFoundError(f"{what} not found: {path} (pass {override}= to point at it)")
    return path


def load_json(path: Path) -> Any:
    """A JSON file's content; anything unreadable is a :class:`SourceFormatError` naming the file."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise SourceFormatError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise SourceFormatError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason})") from exc
    except RecursionError:
        raise SourceFormatError(f"{path}: JSON nested too deeply to be a release file (Python's parser gave up "
                                f"at its recursion limit)") from None
    except ValueError as exc:  # e.g. an int literal of more than 4300 digits
        raise SourceFormatError(f"{path}: not valid JSON ({exc})") from exc


def load_refs(path: Path) -> Any:
    """A refs file: a ``.p`` pickle through the restricted unpickler, anything else as JSON."""
    if path.suffix == ".p":
        try:
            return safe_load(path)
        except PickleReadError as exc:
            raise SourceFormatError(str(exc)) from exc
    return load_json(path)


def release_checksums(files: ReleaseFiles) -> dict[str, str]:
    """sha256 of the refs and instances files, keyed by their path relative to the root."""
    return {_checksum_key(p, files.root): _sha256(p) for p in (files.refs, files.instances)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum_key(path: Path, root: Path) -> str:
    # Paths relative to the root keep manifests comparable across machines.
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
