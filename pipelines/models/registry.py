"""Registered versions of InstAlign in the MLflow Model Registry (DESIGN §5).

A registered InstAlign model is an MLflow pyfunc (``pipelines.models.pyfunc``) whose artifact
``checkpoint`` is the plain checkpoint directory ``instalign.checkpoint`` writes. Promotion
uses MLflow 3 *aliases* (``candidate`` → ``champion``), not the deprecated stages: an alias
is a movable pointer, so promoting is one call and rolling back is another.

:func:`log_and_register` logs a checkpoint as a new version (``instalign train`` does, with
its run id; so does ``instalign register --checkpoint``). A registered version says what it
is: :func:`annotate_version` writes its description (the data it was trained on, its metrics
beside the baselines where known, the promotion decision) and tags (dataset digest, run id,
git commit, metrics) from its training run's record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from instalign.metrics import SLICES
from pipelines.core.redaction import redact
from pipelines.core.tracking import GIT_COMMIT_TAG, MANIFEST_HASH_TAG, metric_key, redacted_context_tags
from pipelines.models.pyfunc import log_model
from pipelines.models.source import RegistryError


def version_for_run(run_id: str, *, name: str | None = None):
    """The registered model version created by run ``run_id`` (the newest if several).

    Raises ``RegistryError`` when the run registered nothing, or registered under several
    model names and ``name`` does not pick one.
    """
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


#: The metrics a version's description and tags report (gRefCOCO semantics, percentages).
_VERSION_METRICS = ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "nt_AUROC", "samples")


def _fmt(value: float | None) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _reported(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The metrics a version records: :data:`_VERSION_METRICS`, then each slice's gIoU and samples."""
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
            (``pipelines.evaluation.promote``): its metrics, measured the same way, and its version.

    Returns:
        The updated ``ModelVersion``.
    """
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


def log_and_register(checkpoint_dir: str | os.PathLike, *, registered_model_name: str, alias: str | None = "candidate",
                     run_id: str | None = None):
    """Log the checkpoint as a pyfunc in run ``run_id`` (or a new run), register it, set ``alias``,
    and describe and tag the version from the run (``pipelines.models.registry.annotate_version``).

    Returns:
        The new ``mlflow.entities.model_registry.ModelVersion`` (``.name``, ``.version``, ``.run_id``).
    """
    active = mlflow.active_run()
    if active is not None and (run_id is None or active.info.run_id == run_id):
        info = log_model(checkpoint_dir, registered_model_name=registered_model_name)
    else:
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register-checkpoint",
                              nested=active is not None, tags=None if run_id else redacted_context_tags()):
            info = log_model(checkpoint_dir, registered_model_name=registered_model_name)
    client = MlflowClient()
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    # Described and tagged from its run from the start; a promotion gate (the quickstart)
    # rewrites the description with its baselines and decision.
    return annotate_version(registered_model_name, version)
