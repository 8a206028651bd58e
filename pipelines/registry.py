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
(only that artifact is downloaded, not the bundled code).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

#: Artifact key of the checkpoint directory inside the pyfunc model (see ``pipelines.pyfunc``).
CHECKPOINT_ARTIFACT = "checkpoint"


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


def resolve_checkpoint(source: str | os.PathLike, *, dst: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory, or a ``models:/`` URI resolved to one on local disk.

    Args:
        source: a directory, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        dst: where to download a registered checkpoint (default: a fresh temporary directory).

    Returns:
        The local checkpoint directory.
    """
    if not is_model_uri(source):
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {str(source)!r}: not a directory (nor a models:/ URI)")
        return path

    import mlflow
    from mlflow.exceptions import MlflowException

    uri = str(source).rstrip("/")
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="instalign-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(dst)))
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message}") from None
    meta = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = (meta.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise RegistryError(f"{uri}: not an InstAlign model (its MLmodel has no {CHECKPOINT_ARTIFACT!r} artifact; "
                            f"artifacts: {sorted(artifacts)})")
    rel = artifacts[CHECKPOINT_ARTIFACT]["path"]
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{rel}", dst_path=str(dst)))


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
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")


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
