"""What a training run starts from, recorded by the driver before training (DESIGN §6.9).

:func:`log_run_inputs` logs every resolved config field and run setting as a param, the git
commit and the dataset manifest's hash as tags, the config YAML, the manifest and the
driver's system info as artifacts — and the prepared dataset as the run's *input*
(``run.inputs.dataset_inputs``: name, a digest of its manifest, the source URI and the
manifest's counts as the profile, :func:`dataset_entity`), so MLflow's lineage links run,
data and registered model. ``instalign evaluate`` logs its split the same way
(:func:`log_dataset_input`, context ``evaluation``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pipelines.core.redaction import redact
from pipelines.core.tracking import GIT_COMMIT_TAG, MANIFEST_HASH_TAG, MlflowTracker, redact_data

# MLflow (~2 s to import) is imported in the functions that log: a verb's module stays cheap to import.

#: MLflow's input tag naming what a dataset was used for (``train``, ``evaluation``).
DATASET_CONTEXT_TAG = "mlflow.data.context"
#: Tries to log a dataset input (a concurrent run may insert the same dataset row first).
_DATASET_ATTEMPTS = 4


def git_commit(path: Union[str, Path, None] = None) -> Optional[str]:
    """HEAD of the git checkout containing ``path`` (this package by default), or ``None``;
    ``-dirty`` appended when tracked files have uncommitted changes."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def system_info() -> dict[str, Any]:
    """Versions and hardware of the driver machine (the workers' are logged by rank 0)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    for mod in ("ray", "mlflow", "timm", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            info[mod] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys): it names the dataset's content
    (the manifest lists every shard with its size, and the source's checksums) and provenance,
    independently of where the dataset is stored."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


#: MLflow stores a dataset digest in at most 36 characters; 32 hex digits of the manifest's
#: SHA-256 (the full one is the run tag ``instalign.dataset_manifest_sha256``).
_DATASET_DIGEST_CHARS = 32


def dataset_entity(manifest: Mapping[str, Any], data_dir: str):
    """The prepared dataset as an ``mlflow.entities.Dataset``: a run input (lineage).

    Name: the dataset named in the manifest; digest: the manifest's (:func:`manifest_digest`);
    source: the redacted location (``{"uri": ...}``, type ``local`` or the URI's scheme);
    profile: the manifest's per-split counts, quarantine, format and creation time.
    """
    from mlflow.entities import Dataset

    uri = redact(str(data_dir))
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "local"
    profile = {key: manifest.get(key) for key in ("counts", "quarantined", "quarantined_samples_dropped", "format",
                                                  "schema_version", "created", "instalign_version")
               if key in manifest}
    return Dataset(name=str(manifest.get("dataset") or "instalign-dataset"),
                   digest=manifest_digest(manifest)[:_DATASET_DIGEST_CHARS],
                   source_type=scheme if scheme != "file" else "local",
                   source=json.dumps({"uri": uri}),
                   profile=json.dumps(redact_data(profile), sort_keys=True))


def log_dataset_input(tracking_uri: str, run_id: str, manifest: Mapping[str, Any], data_dir: str, *,
                      context: str = "train", split: Optional[str] = None):
    """Log the prepared dataset as an input of run ``run_id`` (``context``: what it was used
    for; ``split``: which split, as the input tag ``instalign.split``). Logging the same
    dataset into the same run again (a resumed run) adds nothing. Returns the entity."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    from mlflow.exceptions import MlflowException

    dataset = dataset_entity(manifest, data_dir)
    tags = [InputTag(DATASET_CONTEXT_TAG, context)] + ([InputTag("instalign.split", split)] if split else [])
    client = MlflowClient(tracking_uri=tracking_uri)
    for attempt in range(_DATASET_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])
            return dataset
        except MlflowException as e:
            # An experiment holds one row per (name, digest); the store looks it up, then inserts.
            # Concurrent runs of one experiment (Tune trials) logging the same dataset race
            # between the two: the loser's insert breaks the unique constraint. On retry the
            # lookup finds the winner's row and only the run's link is written.
            if "UNIQUE constraint" not in str(e) and "Duplicate entry" not in str(e) \
                    or attempt == _DATASET_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return dataset


def log_run_inputs(tracker: MlflowTracker, cfg: Any, manifest: Mapping[str, Any], data_dir: str,
                   run_params: Mapping[str, Any]) -> None:
    """What a training run starts from: every resolved config field and run setting as a
    param, the prepared dataset as the run's input (:func:`dataset_entity`), git commit and
    dataset manifest hash as tags, the config YAML, the manifest and the driver's system info
    as artifacts.
    """
    tracker.log_params({**cfg.flat(), **{f"run.{k}": v for k, v in run_params.items()}})
    digest = manifest_digest(manifest)
    tracker.set_tags({GIT_COMMIT_TAG: git_commit() or "unknown", MANIFEST_HASH_TAG: digest,
                      "instalign.dataset": manifest.get("dataset", "?"), "instalign.data_dir": data_dir})
    log_dataset_input(tracker.tracking_uri, tracker.run_id, manifest, data_dir, context="train")
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    tracker.log_dict(dict(manifest), "dataset/_manifest.json")
    tracker.log_dict(system_info(), "system_info.json")
