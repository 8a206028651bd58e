"""Where a model comes from: a checkpoint directory, or a ``models:/`` URI resolved to one.

``resolve_checkpoint`` is shared by every verb that reads a model (``evaluate``, ``promote``,
``predict``, ``serve``): a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI becomes a
local checkpoint directory (only that artifact is downloaded, not the bundled code).
Downloads go to one cache, ``<cache root>/models/<store>/<name>/<version>``
(``instalign.cache``; ``<store>`` is a short digest of the tracking URI, so two registries
never share an entry): a registered version's files never change, so each version is
downloaded once, by one process (others wait on a lock and reuse it), checked against the
checkpoint's own seal, and renamed into place — a partial download is never used. An alias
is resolved to its version on every call, so moving ``@champion`` is seen at once.

``checkpoint_payload`` / ``materialise`` carry a checkpoint to Ray actors through the object
store (evaluation and batch prediction), so actors on other nodes need no shared disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from instalign.cache import cache_root

from instalign.errors import InstAlignError
from instalign.integrity import IntegrityError, build_once
from pipelines.core.tracking import resolve_tracking_uri

# MLflow and instalign.checkpoint (torch) are imported by the functions that use the registry:
# Ray workers import this module (evaluate's actors call ``materialise``), and those two
# imports cost 2.5 CPU-s per worker (measured), for nothing there.

#: Artifact key of the checkpoint directory inside the pyfunc model (see ``pipelines.models.pyfunc``).
CHECKPOINT_ARTIFACT = "checkpoint"

log = logging.getLogger(__name__)



class RegistryError(InstAlignError, RuntimeError):
    """A registry lookup failed; the message names the model, version, alias or run."""


def is_model_uri(source: str | os.PathLike) -> bool:
    return str(source).startswith("models:/")


def configure_tracking(tracking_uri: str | None) -> str:
    """Point MLflow at ``tracking_uri`` (else ``$MLFLOW_TRACKING_URI``, else MLflow's default
    ``sqlite:///<cwd>/mlflow.db``) and return the URI in use."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)  # the cwd default made absolute: same store in every process
    mlflow.set_tracking_uri(uri)
    return uri


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint directory, or a ``models:/`` URI resolved to one in the local cache.

    Args:
        source: a directory, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a logged
            model ``models:/m-<id>``.

    Returns:
        The local checkpoint directory (checked against its seal when it was downloaded;
        ``instalign.checkpoint.load_model`` checks it again on every load).
    """
    if not is_model_uri(source):
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {str(source)!r}: not a directory (nor a models:/ URI)")
        return path

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from instalign.checkpoint import REQUIRED_FILES, SEAL_KIND

    uri = str(source).rstrip("/")
    client = mlflow.MlflowClient()
    try:
        key = get_model_name_and_version(client, uri)  # (name, version) or (logged model id,)
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message}") from None
    pinned = f"models:/{key[0]}/{key[1]}" if len(key) == 2 else f"models:/{key[0]}"
    store = hashlib.sha256(client.tracking_uri.encode()).hexdigest()[:12]
    entry = cache_root() / "models" / store / Path(*(quote(str(k), safe="") for k in key))

    def download(out: Path) -> None:
        log.info("downloading %s (%s) into %s", uri, pinned, entry)
        scratch = out / ".download"
        try:
            mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{pinned}/MLmodel", dst_path=str(scratch)))
            meta = yaml.safe_load(mlmodel.read_text()) or {}
            artifacts = (meta.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
            if CHECKPOINT_ARTIFACT not in artifacts:
                raise RegistryError(f"{uri}: not an InstAlign model (its MLmodel has no {CHECKPOINT_ARTIFACT!r} "
                                    f"artifact; artifacts: {sorted(artifacts)})")
            rel = artifacts[CHECKPOINT_ARTIFACT]["path"]
            checkpoint = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{pinned}/{rel}",
                                                                  dst_path=str(scratch / "artifacts")))
        except MlflowException as e:
            raise RegistryError(f"{uri}: {e.message}") from None
        for item in checkpoint.iterdir():
            os.rename(item, out / item.name)
        shutil.rmtree(scratch)

    try:
        # Cache hits check sizes only: load_model verifies every digest when it loads.
        return build_once(entry, download, kind=SEAL_KIND, required=REQUIRED_FILES, digests=False,
                          sealed_by_build=True)
    except IntegrityError as e:
        raise RegistryError(f"{uri}: the registered checkpoint is incomplete or damaged: {e.file}: {e.problem}") \
            from None


@dataclass(frozen=True)
class ModelRef:
    """What a ``models:/`` URI points at: a registered version (``name``/``version``) and the
    MLflow 3 logged model behind it (``model_id``), or a logged model alone (``models:/m-<id>``)."""

    uri: str
    model_id: str | None
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def model_ref(uri: str) -> ModelRef:
    """Resolve ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/m-<id>`` to the
    version and logged model it means now (an alias is read once, here)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    uri = str(uri).rstrip("/")
    try:
        key = get_model_name_and_version(client, uri)
        if len(key) == 1:  # a logged model, not a registered version
            model = client.get_logged_model(key[0])
            return ModelRef(uri=uri, model_id=model.model_id, run_id=model.source_run_id)
        version = client.get_model_version(*key)
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message}") from None
    return ModelRef(uri=uri, model_id=version_model_id(version), name=version.name, version=str(version.version),
                    run_id=version.run_id)


def version_model_id(version) -> str | None:
    """The logged model (``m-<id>``) a registered version was made from: its ``model_id``, or
    the id in its ``source`` (``models:/m-<id>``; what the sqlite store fills in)."""
    model_id = getattr(version, "model_id", None)
    source = str(version.source or "")
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/"):].split("/")[0]
    return model_id or None


def checkpoint_payload(directory: Path) -> dict[str, bytes]:
    """Every file of a checkpoint directory as ``{relative path: bytes}`` (for the object store)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files[str(path.relative_to(directory))] = path.read_bytes()
    return files


def materialise(payload: dict[str, bytes]) -> tempfile.TemporaryDirectory:
    """Write a checkpoint payload into a fresh local directory (one per actor; removed with it)."""
    tmp = tempfile.TemporaryDirectory(prefix="instalign-eval-ckpt-")
    for rel, data in payload.items():
        target = Path(tmp.name) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return tmp
