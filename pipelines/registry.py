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

A registered version says what it is: :func:`annotate_version` writes its description (the
data it was trained on, its metrics beside the baselines where known, the promotion decision)
and tags (dataset digest, run id, git commit, metrics) from its training run's record.

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
from collections.abc import Mapping
from dataclasses import dataclass
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


#: The metrics a version's description and tags report (gRefCOCO semantics, percentages).
_VERSION_METRICS = ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "nt_AUROC", "samples")


def _fmt(value: float | None) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _reported(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The metrics a version records: :data:`_VERSION_METRICS`, then each slice's gIoU and samples."""
    from instalign.metrics import SLICES

    keys = list(_VERSION_METRICS) + [f"{s}.{k}" for s in SLICES for k in ("gIoU", "samples")]
    return {k: float(metrics[k]) for k in keys if k in (metrics or {})}


def annotate_version(name: str, version: str | int, *, metrics: Mapping[str, float] | None = None,
                     baselines: Mapping[str, Mapping[str, float]] | None = None, decision: str | None = None,
                     metrics_source: str | None = None, champion: Mapping[str, float] | None = None,
                     champion_version: str | int | None = None):
    """Describe and tag registered version ``name``/``version`` from its training run.

    The description (Markdown, shown in the registry UI) says what the version was trained on
    (the run's dataset input: name, digest, per-split counts), its metrics — each slice's
    gIoU and samples too, where measured — beside the ``champion`` it was compared with and
    each baseline in ``baselines``, and the promotion ``decision`` (or that none was taken).
    The tags make versions searchable: ``instalign.dataset``, ``instalign.dataset_digest`` (the
    manifest's SHA-256), ``instalign.run_id``, ``instalign.git_commit``, ``metric.<key>``, and
    with a champion ``instalign.promotion.champion_version`` and ``champion.metric.<key>``.

    Args:
        metrics: the metrics to report (e.g. an ``evaluate`` result); default: the run's last
            ``val_*`` metrics.
        baselines: ``{baseline name: {metric: value}}`` to compare against (percentages).
        decision: the promotion decision in words (the gate and its numbers).
        metrics_source: where ``metrics`` come from, for the description (e.g. ``val split,
            instalign evaluate``).
        champion, champion_version: the ``@champion`` the decision compared this version with
            (``pipelines.promote``): its metrics, measured the same way, and its version.

    Returns:
        The updated ``ModelVersion``.
    """
    import json

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.redaction import redact
    from pipelines.tracking_mlflow import GIT_COMMIT_TAG, MANIFEST_HASH_TAG, metric_key

    client = MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
        run = client.get_run(mv.run_id) if mv.run_id else None
    except MlflowException as e:
        raise RegistryError(f"model {name!r} version {version}: {e.message}") from None
    tags = run.data.tags if run is not None else {}
    if metrics is None and run is not None:
        metrics = {k.removeprefix("val_"): v for k, v in run.data.metrics.items() if k.startswith("val_")}
        metrics_source = metrics_source or "the training run's last validation"
    metrics = _reported(metrics)
    champion = _reported(champion) if champion is not None else None

    lines = [f"InstAlign (generalized referring expression segmentation), version {mv.version} of `{name}`."]
    train = [d.dataset for d in (run.inputs.dataset_inputs if run is not None else [])
             if any(t.key == "mlflow.data.context" and t.value == "train" for t in d.tags)]
    if train:
        ds = train[0]
        counts = json.loads(ds.profile or "{}").get("counts") or {}
        split_counts = ", ".join(f"{split} {c.get('samples', '?')} samples" for split, c in sorted(counts.items()))
        lines.append(f"**Data:** `{ds.name}` (digest `{ds.digest}`; {split_counts or 'counts unknown'}) from "
                     f"`{json.loads(ds.source or '{}').get('uri', '?')}`.")
    elif run is not None:
        lines.append(f"**Data:** `{tags.get('instalign.dataset', 'unknown')}`.")
    else:
        lines.append("**Data:** unknown (registered from a checkpoint directory, outside a training run).")
    if run is not None:
        lines.append(f"**Run:** `{run.info.run_id}`, git `{tags.get(GIT_COMMIT_TAG, 'unknown')}`.")
    if metrics:
        base = dict(baselines or {})
        if champion is not None:
            base = {"champion" + (f" (version {champion_version})" if champion_version else ""): champion, **base}
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        lines += [f"**Metrics** ({metrics_source or 'as given'}; percentages):",
                  row(["metric", "this version", *base]), row(["---"] * (2 + len(base)))]
        lines += [row([key, _fmt(value), *(_fmt(b.get(key)) for b in base.values())]) for key, value in metrics.items()]
        if not baselines:
            lines.append("No baselines were measured for this version.")
    else:
        lines.append("**Metrics:** none recorded.")
    lines.append(f"**Promotion:** {decision}" if decision else
                 "**Promotion:** no decision recorded (aliases say where it stands).")
    # One paragraph per line, except inside the table (consecutive "|" rows).
    text = "\n".join(line if line.startswith("|") and prev.startswith("|") else "\n" + line
                     for prev, line in zip([""] + lines, lines)).strip()
    description = redact(text)

    version_tags = {"instalign.run_id": mv.run_id or "", "instalign.dataset": tags.get("instalign.dataset", ""),
                    "instalign.dataset_digest": tags.get(MANIFEST_HASH_TAG, ""),
                    "instalign.git_commit": tags.get(GIT_COMMIT_TAG, "")}
    version_tags.update({f"metric.{metric_key(k)}": _fmt(v) for k, v in metrics.items()})
    if champion is not None:
        version_tags["instalign.promotion.champion_version"] = str(champion_version or "")
        version_tags.update({f"champion.metric.{metric_key(k)}": _fmt(v) for k, v in champion.items()})
    if decision:
        version_tags["instalign.promotion"] = redact(decision)[:5000]
    try:
        client.update_model_version(name, str(mv.version), description=description)
        for key, value in version_tags.items():
            if value:
                client.set_model_version_tag(name, str(mv.version), key, value)
        if decision and champion is None:  # a new decision without a champion: no stale comparison left
            for key in [k for k in mv.tags if k.startswith("champion.metric.")
                        or k == "instalign.promotion.champion_version"]:
                client.delete_model_version_tag(name, str(mv.version), key)
        return client.get_model_version(name, str(mv.version))
    except MlflowException as e:
        raise RegistryError(f"model {name!r} version {version}: {e.message}") from None


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

    flags.add_tracking(parser, experiment="instalign")  # --experiment: where a --checkpoint's run goes


def run(args: argparse.Namespace) -> int:
    uri = configure_tracking(args.tracking_uri)
    try:
        if args.run:
            version = promote_run(args.run, alias=args.alias, name=args.name)
        else:
            if not args.name:
                print("instalign register: --checkpoint needs --name", file=sys.stderr)
                return 2
            import mlflow

            from pipelines.pyfunc import log_and_register
            from pipelines.tracking_mlflow import ensure_experiment

            # Not MLflow's Default experiment: a sqlite store created by this command would
            # give it ./mlruns of the current directory, and the model's files would land there.
            mlflow.set_experiment(experiment_id=ensure_experiment(uri, args.experiment))
            version = log_and_register(args.checkpoint, registered_model_name=args.name, alias=args.alias)
    except (RegistryError, FileNotFoundError, ValueError) as e:
        print(f"instalign register: {e}", file=sys.stderr)
        return 1
    print(f"models:/{version.name}@{args.alias} -> version {version.version} (run {version.run_id}; {uri})")
    return 0
