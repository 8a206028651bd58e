"""What a training run starts from, recorded by the driver before training (DESIGN §6.9).

:func:`log_run_inputs` logs every resolved config field and run setting as a param, the git
commit and the dataset manifest's hash as tags, the config YAML, the manifest and the
driver's system info as artifacts — and the prepared dataset as the run's *input*
(``run.inputs.dataset_inputs``: name, a digest of its manifest, the source URI and the
manifest's counts as the profile), so MLflow's lineage links run, data and registered
model (``pipelines.data.lineage``, which ``instalign evaluate`` uses for its split too,
context ``evaluation``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pipelines.core.tracking import GIT_COMMIT_TAG, MANIFEST_HASH_TAG, MlflowTracker
from pipelines.data.lineage import log_dataset_input, manifest_digest


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


def log_run_inputs(tracker: MlflowTracker, cfg: Any, manifest: Mapping[str, Any], data_dir: str,
                   run_params: Mapping[str, Any]) -> None:
    """What a training run starts from: every resolved config field and run setting as a
    param, the prepared dataset as the run's input (``pipelines.data.lineage``), git commit and
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
