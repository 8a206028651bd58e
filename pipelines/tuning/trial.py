"""One Tune trial = one training job (``pipelines.training.job``), tracked as an MLflow child run.

Tune runs :func:`trial_driver` per trial (a *function trainable*, the Ray docs' Train V2
pattern "Hyperparameter Tuning with Ray Tune"). It applies the trial's sampled values to the
base config (``pipelines.tuning.space.trial_config``: typed values, validated once), and
:func:`train_trial` assembles and runs the same ``TrainJob`` as ``instalign train``, named
``<search>-<trial id>``, with :class:`ValidatedReportCallback` forwarding rank 0's reports.

What counts as an iteration. Workers call ``ray.train.report`` at every checkpoint: once per
epoch after validation, and also every ``train.checkpoint_every_steps`` with ``val_gIoU =
NaN`` (not validated). Only validated reports reach Tune — so every Tune result carries the
metric (Tune's strict metric check holds) and ASHA never ranks a NaN — and their
``training_iteration`` is the number of epochs the trial's run has begun
(:func:`validated_report`), read from the report itself rather than counted by Tune, so it
stays right when a trial resumes from its Train checkpoint (after ``Tuner.restore`` or a
worker failure) instead of restarting at 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from instalign.config import Config, DataOrder
from pipelines.training.job import TrainJob, plan_data, run_job
from pipelines.core.resources import WorkerResources
from pipelines.tuning.space import trial_config

TRIAL_ID_TAG = "instalign.tune.trial_id"


def validated_report(metrics: dict[str, Any], metric: str) -> Optional[dict[str, Any]]:
    """Rank 0's Train report as a Tune result, or ``None`` for a report without a finite ``metric``.

    ``training_iteration`` = epochs begun: ``epoch`` counts finished epochs, plus one when the
    report comes from inside an epoch (``epoch_step > 0``: ``train.max_steps`` stopped it there).
    """
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    epoch, epoch_step = int(metrics.get("epoch", 0)), int(metrics.get("epoch_step", 0))
    return {**metrics, "training_iteration": epoch + (1 if epoch_step > 0 else 0)}


class ValidatedReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that forwards validated reports only (module docstring)."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        result = validated_report(metrics[0], self.metric)
        if result is not None:
            super().after_report(run_context, [result, *metrics[1:]], checkpoint)


@dataclass
class TrialSettings:
    """What every trial shares, decided once by the search's driver (``pipelines.tuning.tune``)."""

    search_name: str
    base: Config
    data_dir: str
    manifest: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    resources: WorkerResources
    storage_path: str
    max_failures: int
    data_order: DataOrder
    metric: str


def trial_driver(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune's function trainable: one Ray Train run (an MLflow child run) per trial.

    The run itself goes into a child task that carries this cluster's address as
    ``RAY_ADDRESS``, which its Train controller and that controller's detached
    ``PlacementGroupCleaner`` inherit. When ASHA stops a trial, Tune ends this actor, and the
    controller it owns dies with it; the cleaner then frees the run's placement group via
    the State API, which finds the cluster from ``RAY_ADDRESS`` (else by scanning the host).
    On a host with more than one Ray instance the scan fails ("Found multiple active Ray
    instances"), the placement groups of stopped trials leak, and the trials that follow wait
    forever for the CPUs they hold (measured here).
    """
    import ray
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    callback = ValidatedReportCallback(settings.metric)  # made here: it binds this Tune session's queue
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    run = ray.remote(num_cpus=0, max_retries=0)(train_trial).options(runtime_env={"env_vars": env})
    final = ray.get(run.remote(config, settings, trial_id, callback))
    if final is not None:
        # The run's last validated state once more: a trial whose Train run was already at its
        # end when the search resumed reports nothing during fit() and would have no result.
        ray.tune.report(final)


def train_trial(params: dict[str, Any], settings: TrialSettings, trial_id: str,
                callback: Any) -> Optional[dict[str, Any]]:
    """One trial's training job, in its MLflow child run (tag ``mlflow.parentRunId``).

    Returns:
        The run's final metrics as a Tune result (:func:`validated_report`), or ``None``.
    """
    from pipelines.core.tracking import MlflowTracker, start_or_resume_run

    s = settings
    cfg = trial_config(s.base, params)
    run_name = f"{s.search_name}-{trial_id}"
    run_id, _ = start_or_resume_run(tracking_uri=s.tracking_uri, experiment=s.experiment, run_name=run_name,
                                    tags={"mlflow.parentRunId": s.parent_run_id, TRIAL_ID_TAG: trial_id,
                                          "instalign.tune.params": json.dumps(params, sort_keys=True)})
    tracker = MlflowTracker(run_id=run_id, tracking_uri=s.tracking_uri)
    try:
        job = TrainJob(config=cfg, data=plan_data(cfg, s.data_dir, s.manifest, s.resources.num_workers),
                       run_name=run_name, resources=s.resources, storage_path=s.storage_path,
                       tracking_uri=s.tracking_uri, mlflow_run_id=run_id, data_order=s.data_order,
                       max_failures=s.max_failures)
        result = run_job(job, tracker, extra_params=dict(tune_search=s.search_name, tune_trial_id=trial_id),
                         callbacks=[callback], report_waits=False)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    final = validated_report(dict(result.metrics or {}), s.metric)
    if final is not None and result.checkpoint is not None:
        final["checkpoint_path"] = result.checkpoint.path
    return final
