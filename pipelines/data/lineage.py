"""A prepared dataset as an MLflow run input: its digest, its ``Dataset`` entity, and logging it.

Training (``pipelines.training.run_inputs``) and ``instalign evaluate`` both record the
prepared dataset they read as an input of their run (``run.inputs.dataset_inputs``: name, a
digest of its manifest, the source URI and the manifest's counts as the profile), so MLflow's
lineage links run, data and registered model. It lives with the data, below both.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any, Optional

from pipelines.core.redaction import redact
from pipelines.core.tracking import redact_data

__all__ = ["DATASET_CONTEXT_TAG", "manifest_digest", "dataset_name", "dataset_entity", "log_dataset_input"]

# MLflow (~2 s to import) is imported in the functions that log: training and evaluation
# import this module where nothing is logged (Ray workers).

#: MLflow's input tag naming what a dataset was used for (``train``, ``evaluation``).
DATASET_CONTEXT_TAG = "mlflow.data.context"
#: Tries to log a dataset input (a concurrent run may insert the same dataset row first).
_DATASET_ATTEMPTS = 4
#: MLflow stores a dataset digest in at most 36 characters; 32 hex digits of the manifest's
#: SHA-256 (the full one is the run tag ``instalign.dataset_manifest_sha256``).
_DATASET_DIGEST_CHARS = 32


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys): it names the dataset's content
    (the manifest lists every shard with its size, and the source's checksums) and provenance,
    independently of where the dataset is stored."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def dataset_name(manifest: Mapping[str, Any]) -> str:
    """The dataset's name in MLflow: the manifest's ``dataset``, as ``synthetic-<dataset>`` when
    the release was one of ``instalign synthetic``'s (its ``source_info`` description says so),
    so that a synthetic gRefCOCO never reads as the real one in a run's inputs."""
    # Here, not at the top: the generator's module brings NumPy, Pillow and pycocotools (~0.1 s).
    from instalign.data.synthetic import SYNTHETIC_DESCRIPTION_PREFIX

    name = str(manifest.get("dataset") or "instalign-dataset")
    info = manifest.get("source_info")
    description = info.get("description") if isinstance(info, Mapping) else None
    if isinstance(description, str) and description.startswith(SYNTHETIC_DESCRIPTION_PREFIX):
        return f"synthetic-{name}"
    return name


def dataset_entity(manifest: Mapping[str, Any], data_dir: str):
    """The prepared dataset as an ``mlflow.entities.Dataset``: a run input (lineage).

    Name: :func:`dataset_name`; digest: the manifest's (:func:`manifest_digest`);
    source: the redacted location (``{"uri": ...}``, type ``local`` or the URI's scheme);
    profile: the manifest's per-split counts, quarantine, format, creation time and the
    release's ``source_info``.
    """
    from mlflow.entities import Dataset

    uri = redact(str(data_dir))
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "local"
    profile = {key: manifest.get(key) for key in ("counts", "quarantined", "quarantined_samples_dropped", "format",
                                                  "schema_version", "created", "instalign_version", "source_info")
               if key in manifest}
    return Dataset(name=dataset_name(manifest),
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
