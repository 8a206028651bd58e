"""``instalign register``: the MLflow Model Registry side of the pipeline (DESIGN §5).

A registered InstAlign model is an MLflow pyfunc (``pipelines.pyfunc``) whose artifact
``checkpoint`` is the plain checkpoint directory ``instalign.checkpoint`` writes. Promotion
uses MLflow 3 *aliases* (``candidate`` → ``champion``), not the deprecated stages: an alias
is a movable pointer, so promoting is one call and rolling back is another.

Two ways in:

* ``instalign register --run RUN_ID --alias champion [--name NAME]`` — the version that a
  training run registered (``pipelines.train`` calls ``pyfunc.log_and_register`` with its
  run id) gets the alias;
* ``instalign register --checkpoint DIR --name NAME --alias candidate`` — log a checkpoint
  directory as a new version directly (in a fresh MLflow run).

``resolve_checkpoint`` is the other direction, shared by ``evaluate`` and ``predict``: a
``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI becomes a local checkpoint directory
(only that artifact is downloaded, not the bundled code). Downloads go to one cache,
``<cache root>/models/<store>/<name>/<version>`` (``instalign.cache``; ``<store>`` is a short
digest of the tracking URI, so two registries never share an entry): a registered version's
files never change, so each version is downloaded once, by one process (others wait on a
lock and reuse it), checked against the checkpoint's own seal, and renamed into place — a
partial download is never used. An alias is resolved to its version on every call, so
moving ``@champion`` is seen at once.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import yaml

#: Artifact key of the checkpoint directory inside the pyfunc model (see ``pipelines.pyfunc``).
CHECKPOINT_ARTIFACT = "checkpoint"

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry lookup failed; the message names the model, version, alias or run."""


def is_model_uri(source: str | os.PathLike) -> bool:
    return str(source).startswith("models:/")


def configure_tracking(tracking_uri: str | None) -> str:
    """Point MLflow at ``tracking_uri`` (else ``$MLFLOW_TRACKING_URI``, else MLflow's default
    ``sqlite:///<cwd>/mlflow.db``) and return the URI in use."""
    import mlflow

    from pipelines.tracking_mlflow import resolve_tracking_uri

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

    from instalign.cache import cache_root
    from instalign.checkpoint import REQUIRED_FILES, SEAL_KIND
    from instalign.integrity import IntegrityError, build_once

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


def version_for_run(run_id: str, *, name: str | None = None):
    """The registered model version created by run ``run_id`` (the newest if several).

    Raises ``RegistryError`` when the run registered nothing, or registered under several
    model names and ``name`` does not pick one.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    query = f"run_id='{run_id}'" + (f" and name='{name}'" if name else "")
    versions = client.search_model_versions(query)
    if not versions:
        scope = f" under the name {name!r}" if name else ""
        raise RegistryError(f"run {run_id}: no registered model version was created by this run{scope} "
                            f"(tracking URI {client.tracking_uri}); register one with "
                            f"`instalign register --checkpoint DIR --name NAME`")
    names = sorted({v.name for v in versions})
    if len(names) > 1:
        raise RegistryError(f"run {run_id} registered versions of several models {names}: pass --name")
    return max(versions, key=lambda v: int(v.version))


def set_alias(name: str, version: str | int, alias: str):
    """Point ``name@alias`` at ``version`` (moving it from any other version) and return it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.set_registered_model_alias(name, alias, str(version))
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"model {name!r} version {version}: {e.message}") from None


def promote_run(run_id: str, *, alias: str, name: str | None = None):
    """Give the version registered by ``run_id`` the alias ``alias``; returns the version."""
    version = version_for_run(run_id, name=name)
    return set_alias(version.name, version.version, alias)


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_ID", help="promote the model version registered by this MLflow run")
    src.add_argument("--checkpoint", metavar="DIR", help="log and register this checkpoint directory")
    parser.add_argument("--name", help="registered model name (required with --checkpoint; picks one with --run)")
    parser.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    from pipelines import flags

    flags.add_tracking_uri(parser)


def run(args: argparse.Namespace) -> int:
    uri = configure_tracking(args.tracking_uri)
    try:
        if args.run:
            version = promote_run(args.run, alias=args.alias, name=args.name)
        else:
            if not args.name:
                print("instalign register: --checkpoint needs --name", file=sys.stderr)
                return 2
            from pipelines.pyfunc import log_and_register

            version = log_and_register(args.checkpoint, registered_model_name=args.name, alias=args.alias)
    except (RegistryError, FileNotFoundError, ValueError) as e:
        print(f"instalign register: {e}", file=sys.stderr)
        return 1
    print(f"models:/{version.name}@{args.alias} -> version {version.version} (run {version.run_id}; {uri})")
    return 0
