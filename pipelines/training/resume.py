"""Which checkpoint a training run resumes from, and what the next one is called.

A run resumes (the same name again, or Ray restarting a worker group after a failure) from
the newest checkpoint of the run that verifies — not blindly from the latest Ray registered,
which may be truncated or partly uploaded — and never writes a new checkpoint into the
directory of a damaged one Ray still holds. Used by every rank of ``pipelines.training.worker``.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Collection
from typing import Any

import pyarrow.fs as pafs
import ray.train

from instalign.checkpoint import CheckpointError, checkpoint_files

log = logging.getLogger(__name__)


def usable_checkpoint(latest: Any) -> tuple[Any, list[tuple[str, str]]]:
    """The newest checkpoint of the run that verifies, and the newer ones skipped with why.

    Ray resumes from the latest registered checkpoint, whatever its state; a damaged one (a
    truncated ``training_state.safetensors``, a partial upload) would fail every restart the
    same way. So every rank lists the run's checkpoint directories (``step_<n>``, siblings of
    the latest), newest first, and takes the first whose seal verifies
    (``instalign.checkpoint.checkpoint_files``). Every rank sees the same storage, so every
    rank picks the same one. None verifying is an error naming each and its problem.
    """
    if latest is None:
        return None, []
    fs, parent = latest.filesystem, posixpath.dirname(latest.path.rstrip("/"))
    latest_name = posixpath.basename(latest.path.rstrip("/"))
    names = sorted((info.base_name for info in fs.get_file_info(pafs.FileSelector(parent))
                    if info.type == pafs.FileType.Directory and re.fullmatch(r"step_\d{8}(?:\.\d+)?", info.base_name)
                    and info.base_name <= latest_name), reverse=True)
    if latest_name not in names:  # not one of ours: trust Ray's choice
        names.insert(0, latest_name)
    skipped: list[tuple[str, str]] = []
    for name in names:
        candidate = ray.train.Checkpoint(posixpath.join(parent, name), filesystem=fs)
        try:
            with candidate.as_directory() as local:
                checkpoint_files(local)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", name, e)
            skipped.append((name, str(e)))
            continue
        if skipped:
            log.warning("resuming from %s: the newer checkpoint(s) %s are damaged (see above)", name,
                        ", ".join(n for n, _ in skipped))
        return candidate, skipped
    raise CheckpointError(f"no usable checkpoint in {parent}: " + "; ".join(f"{n}: {why}" for n, why in skipped))


def checkpoint_name(step: int, damaged: Collection[str] = ()) -> str:
    """``step_<n>``, or ``step_<n>.<k>`` when ``step_<n>`` is a damaged checkpoint of this run.

    A retry writes the same step's directory again (it overwrites, never orphans). But a
    damaged checkpoint that :func:`usable_checkpoint` passed over is still registered with
    Ray's checkpoint manager; a new checkpoint in the same directory would give the manager
    two entries for one path, and deleting both (``num_to_keep``) fails the run with "Path
    not found" on the second. Such a step gets a directory of its own; names still sort by step.
    """
    name = f"step_{step:08d}"
    k = 0
    while (f"{name}.{k}" if k else name) in damaged:
        k += 1
    return f"{name}.{k}" if k else name
