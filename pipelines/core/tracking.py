"""MLflow behind ``instalign.tracking.Tracker`` (DESIGN §6.9): one run per training job.

Who does what:

* The **driver** resolves the tracking URI, creates the run (or, when a training job with
  the same name is resumed, finds its run again by the ``instalign.run_name`` tag: one
  MLflow run per job, however many times it restarts) and logs what is known before
  training — every resolved config field as a param, git commit, dataset manifest hash,
  system info, the config YAML and the manifest as artifacts. It ends the run.
* Every run this module creates carries MLflow's source tags (``mlflow.source.name`` /
  ``type``, ``mlflow.user``) and the command line (``instalign.command``), all redacted
  (:func:`run_context_tags`); a child run (tag ``mlflow.parentRunId``, a Tune trial) carries
  its parent's, since its own process is a Ray worker started by no command a user typed.
* What the run starts from — params, the prepared dataset as the run's *input* (lineage), git
  commit, system info — is ``pipelines.training.run_inputs``; the per-node system metrics of a training
  job are ``pipelines.training.system_metrics``.
* **Rank 0** of the Train workers opens an :class:`MlflowTracker` on that run id and logs
  per-step and per-epoch metrics and overlays into the same run. Other ranks get the
  ``NullTracker``. Workers never end the run: a restarted worker group keeps logging into it.

The tracking URI is resolved once, on the driver, and handed to workers explicitly: Train
workers run with their cwd inside Ray's session directory, so MLflow's cwd-relative default
(``sqlite:///mlflow.db``) would silently point each of them at a different, empty store.

Everything written to MLflow through this module — run names, params, tags, and the text of
``log_dict`` / ``log_text`` artifacts (the config YAML, the dataset manifest with the command
line that made it) — passes through ``pipelines.core.redaction.redact`` first: a storage path or
URI that carries credentials (``s3://KEY:SECRET@bucket/…``, ``…?token=…``) is recorded with
``***`` in their place. MLflow params cannot be rewritten once logged, so this happens before
anything reaches the store, not as a clean-up afterwards.

``mlflow`` is imported inside functions: this module is imported by ``instalign train
--help`` and by every Train worker, and only rank 0 pays for the import.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from pipelines.core.redaction import command_line, redact, redact_data  # noqa: F401 - redact_data: part of this module's API

log = logging.getLogger(__name__)

#: Tag that identifies a training job across restarts and re-runs with the same ``--name``.
RUN_NAME_TAG = "instalign.run_name"
MANIFEST_HASH_TAG = "instalign.dataset_manifest_sha256"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own key: the UI shows it as "Source"
#: The redacted command line that created the run (``instalign train …``).
COMMAND_TAG = "instalign.command"
#: ... and the one that last resumed it.
RESUME_COMMAND_TAG = "instalign.resumed_command"
PARENT_RUN_TAG = "mlflow.parentRunId"
#: Run tags describing who ran what, inherited by child runs (:func:`run_context_tags`).
_CONTEXT_PREFIXES = ("mlflow.source.", "mlflow.user", COMMAND_TAG)

_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_BATCH = 100  # MLflow's limit on params/tags per log_batch call
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else an sqlite store in the cwd.

    The default is absolute (``sqlite:////abs/cwd/mlflow.db``) so that it means the same
    store in every process it is passed to.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> Optional[str]:
    """Where new experiments keep artifacts: ``<dir of the sqlite file>/mlruns`` for a local
    sqlite store (as MLflow's own default, but absolute); the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def metric_key(key: str) -> str:
    """An MLflow-legal metric/param key (``Pr@0.7`` → ``Pr_0.7``)."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:_MAX_KEY]


def _param_value(value: Any) -> str:
    text = redact(json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value))
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _tag_value(value: Any) -> str:
    return redact(str(value))[:5000]


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with an absolute artifact root) if missing."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))


def find_run(tracking_uri: str, experiment_id: str, run_name: str):
    """The newest run of ``experiment_id`` tagged with ``run_name`` (``None`` if there is none)."""
    client = _client(tracking_uri)
    escaped = run_name.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{escaped}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def start_or_resume_run(*, tracking_uri: str, experiment: str, run_name: str,
                        tags: Optional[Mapping[str, Any]] = None,
                        context: Optional[Mapping[str, str]] = None) -> tuple[str, bool]:
    """Create the job's MLflow run, or reopen the one a previous attempt of ``run_name`` made.

    The run name and tags are redacted (module docstring); a name that carried a credential
    is found again by its redacted form, so resuming still works.

    Args:
        tags: extra tags; they win over ``context`` on the same key.
        context: who ran what (source, user, command). Default: for a child run (``tags``
            has ``mlflow.parentRunId``) its parent's context tags, else :func:`run_context_tags`
            of this process. A resumed run keeps its first command and records the resuming
            one as ``instalign.resumed_command``.

    Returns:
        ``(run_id, resumed)``; a resumed run is set back to ``RUNNING``.
    """
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    run_name = redact(run_name)
    found = find_run(tracking_uri, experiment_id, run_name)
    extra = {k: _tag_value(v) for k, v in (tags or {}).items()}
    if context is None:
        parent = extra.get(PARENT_RUN_TAG)
        context = parent_context_tags(tracking_uri, parent) if parent else run_context_tags()
    context = {k: _tag_value(v) for k, v in context.items()}
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        resumed_tags = {RUN_NAME_TAG: run_name, **extra, "instalign.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if COMMAND_TAG in context:
            resumed_tags[RESUME_COMMAND_TAG] = context[COMMAND_TAG]
        for key, value in {**{k: v for k, v in context.items() if k not in found.data.tags}, **resumed_tags}.items():
            client.set_tag(run_id, key, value)
        return run_id, True
    run = client.create_run(experiment_id, tags={**context, RUN_NAME_TAG: run_name, **extra}, run_name=run_name)
    return run.info.run_id, False


def run_context_tags(argv: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Who ran what, for a run created with ``MlflowClient.create_run`` (which, unlike
    ``mlflow.start_run``, adds no tags of its own): MLflow's context tags
    (:func:`redacted_context_tags`: ``mlflow.user``, ``mlflow.source.name`` / ``type``, git
    commit and remote when the source is in a checkout) plus ``instalign.command``, the
    command line (``sys.argv`` by default), all redacted."""
    tags = redacted_context_tags()
    tags[COMMAND_TAG] = _tag_value(command_line(sys.argv if argv is None else argv))
    return tags


def parent_context_tags(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """The context tags (source, user, command) of run ``parent_run_id``, for its child runs:
    a Tune trial's process is a Ray worker, whose own ``sys.argv`` says nothing to a user."""
    tags = _client(tracking_uri).get_run(parent_run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith(_CONTEXT_PREFIXES)}


class MlflowTracker:
    """``instalign.tracking.Tracker`` writing into an existing MLflow run by id.

    Args:
        run_id: the run the driver created.
        tracking_uri: the resolved (absolute) tracking URI.
        owns_run: end the run in :meth:`close` (the driver); workers leave it open.
    """

    def __init__(self, *, run_id: str, tracking_uri: str, owns_run: bool = False) -> None:
        import mlflow  # noqa: F401  (imported here so non-tracking ranks never pay for it)

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._client = _client(tracking_uri)
        self._owns_run = owns_run
        self._closed = False

    # --- Tracker protocol ---------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; a key already on the run keeps its first value (MLflow params are
        immutable) and a changed value is recorded as an ``instalign.param_changed.*`` tag."""
        from mlflow.entities import Param, RunTag

        existing = self._client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            key, text = metric_key(key), _param_value(value)
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed.append(RunTag(f"instalign.param_changed.{key}"[:_MAX_KEY], _tag_value(f"{existing[key]} -> {text}")))
        for i in range(0, len(new), _BATCH):
            self._client.log_batch(self.run_id, params=new[i:i + _BATCH])
        for i in range(0, len(changed), _BATCH):
            self._client.log_batch(self.run_id, tags=changed[i:i + _BATCH])
        if changed:
            log.warning("MLflow run %s: %d param(s) differ from the first attempt's and keep their first value: %s",
                        self.run_id, len(changed), ", ".join(t.key for t in changed))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):  # MLflow stores NaN, but plots and comparisons choke on it
                batch.append(Metric(metric_key(key), value, now, int(step)))
        for i in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_artifact(self, path: Union[str, Path], artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"MlflowTracker.log_artifact: {path} does not exist")

    def log_image(self, image: Any, name: str) -> None:
        self._client.log_image(self.run_id, image, artifact_file=name)

    def close(self) -> None:
        if self._owns_run and not self._closed:
            self._client.set_terminated(self.run_id, "FINISHED")
        self._closed = True

    # --- beyond the protocol ------------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k[:_MAX_KEY], _tag_value(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_dict(self, data: Any, name: str) -> None:
        """A JSON (``.json``) or YAML (``.yaml``) artifact from an in-memory object (strings redacted)."""
        self._client.log_dict(self.run_id, redact_data(data), name)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact (redacted)."""
        self._client.log_text(self.run_id, redact(text), name)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED``, ``KILLED``)."""
        self._client.set_terminated(self.run_id, status)
        self._closed = True

    def __enter__(self) -> "MlflowTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_checkpoint(tracker: MlflowTracker, checkpoint_dir: Union[str, Path], artifact_path: str) -> None:
    """A checkpoint directory as artifacts under ``artifact_path``, as an inference checkpoint.

    Only what inference needs (weights, config, tokenizer), sealed anew
    (``instalign.checkpoint.export_inference_checkpoint``), so the downloaded copy loads with
    ``load_model``: the optimizer state is twice the model's size and belongs to the Ray run
    directory, which resumes from it.
    """
    from instalign.checkpoint import export_inference_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        dst = export_inference_checkpoint(checkpoint_dir, Path(tmp) / "checkpoint")
        tracker.log_artifact(dst, artifact_path)  # a directory: its files land under artifact_path/


def redacted_context_tags() -> dict[str, str]:
    """The tags MLflow adds on its own to a run or logged model (``mlflow.source.name`` — the
    script path —, ``mlflow.source.git.repoURL`` — the git remote, which may embed a token —,
    ``mlflow.user``, ...), redacted. Passed explicitly as ``tags=`` to ``mlflow.start_run`` and
    ``log_model``, they replace MLflow's verbatim values before anything is stored."""
    from mlflow.tracking.context.registry import resolve_tags

    return {key: _tag_value(value) for key, value in resolve_tags().items()}
