"""``instalign tune``: hyper-parameter search over InstAlign training on Ray Tune (DESIGN §5, §6.8).

The search space is a YAML file of ``tune_spaces/`` (``pipelines.tune_space``): dotted keys of
``instalign.config.Config`` — the loss weights of eqs. 5–7 and 13, the query count N, the
Table 3 switches — each with a distribution. The shape follows the Ray docs' Train V2
pattern ("Hyperparameter Tuning with Ray Tune"):

* **Tune** runs a *function trainable* per trial, :func:`trial_driver`, given a sliver of a
  CPU (:data:`TRIAL_CPU`: a whole CPU would keep the workers from being placed, 0 is refused).
  It turns the sampled dotted keys into overrides of the base config and builds and fits a
  ``TorchTrainer`` (``pipelines.train.build_trainer``) named ``<search>-<trial id>``, with
  :class:`ValidatedReportCallback` forwarding rank 0's reports to Tune (:func:`train_trial`,
  in a child task that knows the cluster's address — see :func:`trial_driver` for why).
* **What counts as an iteration.** Workers call ``ray.train.report`` at every checkpoint:
  once per epoch after validation, and also every ``train.checkpoint_every_steps`` with
  ``val_gIoU = NaN`` (not validated). Only validated reports reach Tune — so every Tune
  result carries the metric (Tune's strict metric check holds) and ASHA never ranks a NaN —
  and their ``training_iteration`` is the number of epochs the trial's run has begun
  (:func:`validated_report`), read from the report itself rather than counted by Tune, so it
  stays right when a trial resumes from its Train checkpoint (after ``Tuner.restore`` or a
  worker failure) instead of restarting at 1.
* **ASHA** (``AsyncHyperBandScheduler``) stops a trial whose metric at a rung (grace·rfᵏ
  epochs) is below the ``1 - 1/rf`` quantile of the trials recorded there before it.
  ``--scheduler none`` runs every trial to the end (Table 3, whose rows must be complete).
* **Resume.** The same ``--name`` (and storage path) again restores the search
  (``Tuner.restore``): finished trials are kept, unfinished ones run again, and each of those
  resumes its Train run from its latest checkpoint (same run name). The MLflow parent run
  is found again by name, and a different search under the same name is refused.
* **Concurrency.** ``max_concurrent × (TRIAL_CPU + workers × CPUs per worker)`` must leave a
  whole CPU for the Ray Data tasks that read the data (else the runs hang), and GPUs must
  suffice for the workers of every concurrent trial (:func:`plan_concurrency`).

MLflow: one parent run per search (settings, the space, the table of trials as CSV/JSON, a
plot of the metric against each hyper-parameter, the best config as a YAML for ``instalign
train --config``); each trial's training run is a child run (tag ``mlflow.parentRunId``) that
the trial driver creates and rank 0 of its workers logs into. ``--register-best NAME``
registers the best trial's best checkpoint (``pipelines.pyfunc.log_and_register``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from instalign.config import Config, load_config
from pipelines.tune_space import SearchSpace, load_space, trial_overrides

log = logging.getLogger(__name__)

#: CPU share of a trial's driver function (PLATFORM-FACTS: 1 starves the workers, 0 is rejected).
TRIAL_CPU = 0.01
TRIAL_ID_TAG = "instalign.tune.trial_id"
SEARCH_FINGERPRINT_TAG = "instalign.tune.fingerprint"
METRICS = ("val_gIoU", "val_cIoU", "val_N_acc", "val_T_acc", "val_Pr@0.7", "val_Pr@0.8", "val_Pr@0.9")
SCHEDULERS = ("asha", "none")
#: CPUs kept free for Ray Data: its file-listing and Parquet read tasks take a whole CPU each.
DATA_CPUS = 1.0
#: MLflow status of a trial's child run by its outcome (``unfinished``: the search was
#: interrupted; the same command again resumes the trial and reopens its run).
CHILD_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED", "unfinished": "KILLED"}
_TRIAL_DIR_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


# --- what reaches Tune ----------------------------------------------------------------------

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


# --- planning -------------------------------------------------------------------------------

def data_cpus_per_task(cpus_per_worker: float) -> float:
    """CPUs per Ray Data decode task: what a fractional worker leaves of its CPU, else a whole one
    (as ``pipelines.train``)."""
    fraction = cpus_per_worker - math.floor(cpus_per_worker)
    return round(1.0 - fraction, 3) if fraction > 1e-9 else 1.0


def default_cpus_per_worker(*, total_cpus: float, num_workers: int, concurrent: int, use_gpu: bool) -> float:
    """1 per GPU worker; on CPU, a quarter-CPU-granular share of what is left after keeping a
    quarter of the cluster (at least one CPU) for Ray Data, at most 4, at least 0.25."""
    if use_gpu:
        return 1.0
    room = total_cpus - max(1.0, 0.25 * total_cpus) - concurrent * TRIAL_CPU
    return max(0.25, min(4.0, math.floor(4 * room / (num_workers * concurrent)) / 4))


def plan_concurrency(*, total_cpus: float, total_gpus: float, num_workers: int, cpus_per_worker: float,
                     gpus_per_worker: float, max_concurrent: Optional[int]) -> int:
    """Trials that may run at once (as many as fit when ``max_concurrent`` is None).

    ``M × (TRIAL_CPU + W × C)`` CPUs must leave at least one whole CPU free: Ray Data's file
    listing and Parquet read tasks take 1 CPU each, and with less free the trials' Train
    workers wait forever for their input (PLATFORM-FACTS, "Deadlock"; measured here: two
    0.5-CPU trials on 2 CPUs leave 0.98 and hang). ``M × W × G`` must not exceed the GPUs.

    Raises:
        ValueError: an explicit ``max_concurrent`` that does not fit, or not even one trial fits.
    """
    per_trial = TRIAL_CPU + num_workers * cpus_per_worker
    fit = math.floor((total_cpus - DATA_CPUS) / per_trial + 1e-9)
    why = (f"each trial takes {TRIAL_CPU} + {num_workers} workers × {cpus_per_worker:g} CPUs = {per_trial:g} CPUs "
           f"and {DATA_CPUS:g} of the cluster's {total_cpus:g} CPUs must stay free for Ray Data's read tasks")
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(total_gpus / (num_workers * gpus_per_worker) + 1e-9))
        why += f"; each trial takes {num_workers} × {gpus_per_worker:g} of the cluster's {total_gpus:g} GPUs"
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {max_concurrent}")
        if max_concurrent > fit:
            raise ValueError(f"--max-concurrent {max_concurrent} does not fit: {why} (at most {max(fit, 0)} at once). "
                             "Lower --max-concurrent or --cpus-per-worker, or add nodes.")
        return max_concurrent
    if fit < 1:
        raise ValueError(f"not even one trial fits: {why}. Lower --cpus-per-worker (fractions are fine) or add nodes.")
    return fit


def expected_iterations(cfg: Config, train_samples: int, max_iterations: int) -> int:
    """Tune iterations (validations) a trial of ``cfg`` runs unless stopped early."""
    steps_per_epoch = max(1, train_samples // cfg.train.batch_size)
    total = cfg.train.epochs * steps_per_epoch
    steps = min(cfg.train.max_steps or total, total)
    return min(math.ceil(steps / steps_per_epoch), max_iterations)


def require_optuna(space: SearchSpace) -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ImportError(f"{space.path}: search=optuna needs Optuna, an optional extra: "
                          "pip install 'instalign[optuna]' (or pip install optuna)") from None


def build_search_alg(space: SearchSpace, *, metric: str, mode: str, seed: int, max_concurrent: int):
    """Tune's searcher: ``BasicVariantGenerator`` (random and grid), or ``OptunaSearch`` (TPE).

    The concurrency limit goes into the generator itself: Ray 2.60 silently ignores
    ``TuneConfig.max_concurrent_trials`` (one log warning) when a ``BasicVariantGenerator``
    instance is passed, and then starts every trial at once.
    """
    if space.search == "optuna":
        require_optuna(space)
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def build_scheduler(kind: str, *, max_iterations: int, grace_period: int, reduction_factor: float,
                    time_attr: str = "training_iteration"):
    """ASHA on :func:`validated_report`'s iterations (epochs), or FIFO (every trial to its end)."""
    if kind == "none":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    if kind != "asha":
        raise ValueError(f"scheduler={kind!r}: expected one of {SCHEDULERS}")
    if not 1 <= grace_period <= max_iterations:
        raise ValueError(f"grace period {grace_period} must be in [1, max iterations {max_iterations}]")
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=time_attr, max_t=max_iterations, grace_period=grace_period,
                         reduction_factor=reduction_factor)


# --- one trial ------------------------------------------------------------------------------

@dataclass
class TrialSettings:
    """Everything a trial driver needs besides its sampled params (plain data, sent to the trials)."""

    search_name: str
    base: dict[str, Any]  # Config.to_dict() of the base config
    data_dir: str
    manifest: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    num_workers: int
    use_gpu: bool
    gpus_per_worker: float
    cpus_per_worker: float
    data_cpus: float
    storage_path: str
    max_failures: int
    data_order: str
    metric: str


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's sampled dotted keys applied (validated like any override)."""
    return load_config(base, trial_overrides(params))


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


def train_trial(config: dict[str, Any], settings: TrialSettings, trial_id: str,
                callback: Any) -> Optional[dict[str, Any]]:
    """One trial's training: its MLflow child run, its Ray Datasets, its ``TorchTrainer``.

    Returns:
        The run's final metrics as a Tune result (:func:`validated_report`), or ``None``.
    """
    from pipelines.tracking_mlflow import MlflowTracker, log_run_inputs, start_or_resume_run
    from pipelines.train import RunSpec, build_datasets, build_trainer, count_samples

    s = settings
    cfg = trial_config(Config.from_dict(s.base, source="tune base"), config)
    run_name = f"{s.search_name}-{trial_id}"
    run_id, _ = start_or_resume_run(tracking_uri=s.tracking_uri, experiment=s.experiment, run_name=run_name,
                                    tags={"mlflow.parentRunId": s.parent_run_id, TRIAL_ID_TAG: trial_id,
                                          "instalign.tune.params": json.dumps(config, sort_keys=True)})
    tracker = MlflowTracker(run_id=run_id, tracking_uri=s.tracking_uri)
    try:
        n_train = count_samples(s.manifest, cfg.data.train_split, cfg.data.max_train_samples, s.data_dir)
        steps_per_epoch = n_train // cfg.train.batch_size
        log_run_inputs(tracker, cfg, s.manifest, s.data_dir, dict(
            num_workers=s.num_workers, use_gpu=s.use_gpu, gpus_per_worker=s.gpus_per_worker if s.use_gpu else 0,
            cpus_per_worker=s.cpus_per_worker, data_order=s.data_order, train_samples=n_train,
            steps_per_epoch=steps_per_epoch, max_failures=s.max_failures, tune_search=s.search_name,
            tune_trial_id=trial_id))
        spec = RunSpec(run_name=run_name, data_dir=s.data_dir, steps_per_epoch=steps_per_epoch,
                       tracking_uri=s.tracking_uri, mlflow_run_id=run_id, data_order=s.data_order)
        datasets = build_datasets(cfg, s.data_dir, data_order=s.data_order, num_cpus=s.data_cpus)
        trainer = build_trainer(cfg, spec, datasets, num_workers=s.num_workers, use_gpu=s.use_gpu,
                                cpus_per_worker=s.cpus_per_worker, gpus_per_worker=s.gpus_per_worker,
                                storage_path=s.storage_path, max_failures=s.max_failures, callbacks=[callback])
        result = trainer.fit()
        tracker.set_tags({"instalign.ray_run_path": result.path})
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    final = validated_report(dict(result.metrics or {}), s.metric)
    if final is not None and result.checkpoint is not None:
        final["checkpoint_path"] = result.checkpoint.path
    return final


# --- after the search -----------------------------------------------------------------------

@dataclass
class TrialRow:
    """One line of the table of trials."""

    trial_id: str
    status: str  # completed | stopped_early | error
    params: dict[str, Any]
    iterations: int
    best: float  # the trial's best metric over its iterations (NaN: none reported)
    last: float
    best_iteration: int
    checkpoint_path: Optional[str]  # the Train checkpoint reported with ``best``
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None


@dataclass
class TuneResult:
    name: str
    path: str  # the Tune experiment directory
    parent_run_id: str
    tracking_uri: str
    metric: str
    mode: str
    trials: list[TrialRow]
    best: Optional[TrialRow]
    best_config_path: Optional[str]
    report_dir: str
    restored: bool = False
    complete: bool = True  # False: interrupted (Ctrl-C, SIGUSR1); the same command resumes it
    registered_version: Optional[str] = None
    artifacts: list[str] = field(default_factory=list)


def summarize(grid: Any, *, base: Config, metric: str, mode: str, train_samples: int, max_iterations: int,
              run_ids: dict[str, str], tune_status: dict[str, str]) -> list[TrialRow]:
    """One :class:`TrialRow` per trial of a ``ResultGrid`` (best over all its iterations).

    ``tune_status`` is Tune's own state of each trial (``TERMINATED``, ``ERROR``; anything else
    after ``fit`` returns means the search was interrupted). Tune does not record *why* a
    trial terminated: one that ended before the iterations its config schedules (capped by
    ASHA's ``max_t``) was stopped early.
    """
    rows = []
    for r in grid:
        history = r.metrics_dataframe
        trial_id = (r.metrics or {}).get("trial_id")
        if not trial_id:  # no result at all: the id is in the trial directory's name
            match = _TRIAL_DIR_ID.search(Path(r.path).name)
            trial_id = match.group(1) if match else Path(r.path).name
        trial_id = str(trial_id)
        best = last = math.nan
        best_it, iterations, ckpt = 0, 0, None
        if history is not None and metric in history:
            h = history[history[metric].notna()]
            if len(h):
                i = h[metric].idxmax() if mode == "max" else h[metric].idxmin()
                best, last = float(h.at[i, metric]), float(h[metric].iloc[-1])
                best_it, iterations = int(h.at[i, "training_iteration"]), int(h["training_iteration"].max())
                ckpt = h.at[i, "checkpoint_path"] if "checkpoint_path" in h else None
                ckpt = ckpt if isinstance(ckpt, str) else None
        if r.error is not None or tune_status.get(trial_id) == "ERROR":
            status = "error"
        elif tune_status.get(trial_id, "TERMINATED") != "TERMINATED":
            status = "unfinished"
        else:
            expected = expected_iterations(trial_config(base, r.config), train_samples, max_iterations)
            status = "completed" if iterations >= expected else "stopped_early"
        rows.append(TrialRow(trial_id=trial_id, status=status, params=dict(r.config), iterations=iterations, best=best,
                             last=last, best_iteration=best_it, checkpoint_path=ckpt,
                             mlflow_run_id=run_ids.get(trial_id),
                             error=None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:500]))
    return sorted(rows, key=lambda row: row.trial_id)


def pick_best(rows: list[TrialRow], mode: str) -> Optional[TrialRow]:
    scored = [r for r in rows if math.isfinite(r.best)]
    if not scored:
        return None
    return max(scored, key=lambda r: r.best) if mode == "max" else min(scored, key=lambda r: r.best)


def write_table(rows: list[TrialRow], metric: str, out_dir: Path) -> list[Path]:
    """``trials.csv`` (one column per hyper-parameter) and ``trials.json``."""
    keys = sorted({k for r in rows for k in r.params})
    csv_path, json_path = out_dir / "trials.csv", out_dir / "trials.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "iterations", f"{metric}_best", f"{metric}_last", "best_iteration", *keys,
                    "checkpoint_path", "mlflow_run_id", "error"])
        for r in rows:
            w.writerow([r.trial_id, r.status, r.iterations, r.best, r.last, r.best_iteration,
                        *(r.params.get(k, "") for k in keys), r.checkpoint_path or "", r.mlflow_run_id or "",
                        r.error or ""])
    plain = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
             for r in rows]  # NaN is not JSON: no metric is null
    json_path.write_text(json.dumps(plain, indent=2, default=str))
    return [csv_path, json_path]


def plot_metric_vs_params(rows: list[TrialRow], space: SearchSpace, metric: str, path: Path) -> Path:
    """One panel per hyper-parameter: each trial's best metric against its value (o: completed,
    x: stopped early, +: unfinished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(space.params)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, p in zip(axes.flat, space.params):
        numeric = p.type in ("uniform", "loguniform", "randint") or all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in p.values)
        labels = [] if numeric else [str(v) for v in p.values]
        for status, marker in (("completed", "o"), ("stopped_early", "x"), ("unfinished", "+")):
            pts = [(r.params[p.key], r.best) for r in rows if r.status == status and p.key in r.params
                   and math.isfinite(r.best)]
            if pts:
                xs = [x if numeric else labels.index(str(x)) for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], marker=marker, label=status.replace("_", " "))
        xs_all = [r.params[p.key] for r in rows if p.key in r.params] if numeric else []
        if p.type == "loguniform" or (xs_all and min(xs_all) > 0 and max(xs_all) > 100 * min(xs_all)):
            ax.set_xscale("log")
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(p.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{metric} (best per trial) vs hyper-parameters — {Path(space.path).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def _fingerprint(space_path: str, base: Config, settings: dict[str, Any]) -> str:
    text = Path(space_path).read_text() + base.to_yaml() + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the driver -----------------------------------------------------------------------------

def tune(space_path: str, data_dir: str, *, config: Any = None, overrides: tuple[str, ...] = (),
         num_samples: Optional[int] = None, max_concurrent: Optional[int] = None, workers_per_trial: int = 1,
         gpus_per_worker: float = 0.0, cpus_per_worker: Optional[float] = None, address: Optional[str] = None,
         metric: str = "val_gIoU", mode: str = "max", name: Optional[str] = None, storage_path: Optional[str] = None,
         experiment: str = "instalign-tune", tracking_uri: Optional[str] = None, register_best: Optional[str] = None,
         scheduler: str = "asha", max_iterations: Optional[int] = None, grace_period: int = 1,
         reduction_factor: float = 3.0, seed: int = 0, max_failures: int = 1, data_order: str = "streaming",
         resume_errored: bool = False) -> TuneResult:
    """Search ``space_path`` over trainings on ``data_dir``; resume if ``name`` ran before.

    Args:
        config: the base config — a preset name, YAML path or ``Config`` (default: the space's ``base``).
        overrides: dotted overrides of the base config (``train.epochs=4``).
        num_samples: trials (random/optuna; default 10), or repeats of the whole grid (default 1).
        max_concurrent: trials at once (default: as many as fit, :func:`plan_concurrency`).
        workers_per_trial / gpus_per_worker / cpus_per_worker: each trial's Ray Train run; GPUs
            when ``gpus_per_worker > 0``; CPUs default to 1 per GPU worker, or what leaves room
            for data for ``max_concurrent`` (default 1) CPU trials.
        metric / mode: what ASHA and the best trial are judged by (a ``val_`` metric).
        name / storage_path: the search (Tune experiment ``<storage>/<name>``); the same name resumes.
        experiment / tracking_uri: MLflow experiment and store (default ``./mlflow.db``).
        register_best: register the best trial's best checkpoint under this model name.
        scheduler: ``asha`` or ``none``; max_iterations (default: the base config's epochs),
            grace_period, reduction_factor: ASHA's ``max_t``, grace period and rate (in epochs).
        seed: the searcher's seed (random sampling, TPE).
        max_failures: worker-group restarts within a trial's Train run.
        data_order: ``streaming`` or ``ordered`` (``pipelines.train``).
        resume_errored: on resume, also re-run trials that errored.
    """
    from ray import tune as ray_tune

    from instalign.data.parquet import read_manifest
    from pipelines.ray_utils import ResourceWaitReporter, init_ray
    from pipelines.tracking_mlflow import (MlflowTracker, ensure_experiment, find_run, resolve_tracking_uri,
                                           start_or_resume_run)
    from pipelines.train import DATA_ORDERS, count_samples

    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: Tune sees the validation metrics only; expected one of {METRICS}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: expected max or min")
    if data_order not in DATA_ORDERS:
        raise ValueError(f"data_order={data_order!r}: expected one of {DATA_ORDERS}")
    if workers_per_trial < 1:
        raise ValueError(f"workers_per_trial must be >= 1, got {workers_per_trial}")
    if config is None:
        import yaml

        raw = yaml.safe_load(Path(space_path).read_text()) if Path(space_path).is_file() else None
        config = str(raw.get("base", "paper")) if isinstance(raw, dict) else "paper"
    base = load_config(config, list(overrides))
    space = load_space(space_path, base)
    data_dir = data_dir if "://" in str(data_dir) else str(Path(data_dir).resolve())
    manifest = read_manifest(data_dir)
    n_train = count_samples(manifest, base.data.train_split, base.data.max_train_samples, data_dir)
    count_samples(manifest, base.data.val_split, base.data.max_val_samples, data_dir)
    max_iterations = max_iterations or max([base.train.epochs] + [
        int(v) for p in space.params if p.key == "train.epochs" for v in p.candidates()])
    for p in space.params:  # every value must give a runnable trial, checked before anything starts
        for value in p.candidates():
            cfg = trial_config(base, {p.key: value})
            n = count_samples(manifest, cfg.data.train_split, cfg.data.max_train_samples, data_dir)
            if cfg.train.batch_size % workers_per_trial or n < cfg.train.batch_size:
                raise ValueError(f"{space.path}: {p.key}={value!r}: train.batch_size={cfg.train.batch_size} must "
                                 f"split evenly over {workers_per_trial} workers and be <= the {n} train samples")
    num_samples = num_samples or (1 if space.is_grid else 10)
    if space.search == "optuna":
        require_optuna(space)  # before any cluster starts
    sched = build_scheduler(scheduler, max_iterations=max_iterations, grace_period=grace_period,
                            reduction_factor=reduction_factor)

    init_ray(address)
    import ray

    use_gpu = gpus_per_worker > 0
    resources = ray.cluster_resources()
    total_cpus, total_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(total_cpus=total_cpus, num_workers=workers_per_trial,
                                                  concurrent=max_concurrent or 1, use_gpu=use_gpu)
        if not use_gpu and max_concurrent is None:
            max_concurrent = 1  # the derived CPU share is sized for one trial at a time
    try:
        concurrency = plan_concurrency(total_cpus=total_cpus, total_gpus=total_gpus, num_workers=workers_per_trial,
                                       cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                       max_concurrent=max_concurrent)
    except ValueError as e:
        if not address:
            raise
        if max_concurrent is None:
            raise ValueError(f"{e} On an autoscaling cluster pass --max-concurrent (and --cpus-per-worker): "
                             "what it has now is not what it can grow to.") from None
        log.warning("%s — going ahead on a joined cluster that may still scale up", e)
        concurrency = max_concurrent
    data_cpus = data_cpus_per_task(cpus_per_worker)

    name = name or f"tune-{Path(space_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_path if storage_path and "://" in storage_path else \
        str(Path(storage_path or "ray_results").expanduser().resolve())
    exp_path = _join(storage, name)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    settings = dict(space=str(Path(space_path).resolve()), search=space.search, num_samples=num_samples,
                    metric=metric, mode=mode, scheduler=scheduler, max_iterations=max_iterations,
                    grace_period=grace_period, reduction_factor=reduction_factor, seed=seed,
                    workers_per_trial=workers_per_trial, gpus_per_worker=gpus_per_worker,
                    cpus_per_worker=cpus_per_worker, data_dir=data_dir, data_order=data_order)
    fingerprint = _fingerprint(space_path, base, settings)
    previous = find_run(tracking_uri, ensure_experiment(tracking_uri, experiment), name)
    known = previous.data.tags.get(SEARCH_FINGERPRINT_TAG) if previous is not None else None
    if known and known != fingerprint:
        raise ValueError(f"search {name!r} already exists (MLflow run {previous.info.run_id}) with a different "
                         "space, base config, data or settings; resuming it with these would mix two searches — "
                         "choose a new --name")
    parent_id, _ = start_or_resume_run(tracking_uri=tracking_uri, experiment=experiment, run_name=name,
                                       tags={"instalign.kind": "tune"})
    parent = MlflowTracker(run_id=parent_id, tracking_uri=tracking_uri, owns_run=True)
    try:
        parent.set_tags({SEARCH_FINGERPRINT_TAG: fingerprint, "instalign.tune.path": exp_path})
        parent.log_params({**{f"tune.{k}": v for k, v in settings.items()}, "tune.max_concurrent": concurrency,
                           **{f"space.{p.key}": (p.values if p.type in ("choice", "grid") else
                                                 f"{p.type}({p.low}, {p.high})") for p in space.params}})
        parent.log_artifact(space_path, "search")
        parent.log_text(base.to_yaml(), "search/base_config.yaml")

        trial_settings = TrialSettings(
            search_name=name, base=base.to_dict(), data_dir=data_dir, manifest=manifest, tracking_uri=tracking_uri,
            experiment=experiment, parent_run_id=parent_id, num_workers=workers_per_trial, use_gpu=use_gpu,
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, data_cpus=data_cpus,
            storage_path=storage, max_failures=max_failures, data_order=data_order, metric=metric)
        trainable = ray_tune.with_resources(ray_tune.with_parameters(trial_driver, settings=trial_settings),
                                            {"cpu": TRIAL_CPU})
        restored = ray_tune.Tuner.can_restore(exp_path)
        if restored:
            log.info("resuming search %s from %s (its saved scheduler, searcher and concurrency apply)", name, exp_path)
            tuner = ray_tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                           resume_errored=resume_errored)
        else:
            tuner = ray_tune.Tuner(
                trainable, param_space=space.to_param_space(),
                tune_config=ray_tune.TuneConfig(
                    metric=metric, mode=mode, scheduler=sched, num_samples=num_samples,
                    search_alg=build_search_alg(space, metric=metric, mode=mode, seed=seed,
                                                max_concurrent=concurrency)),
                run_config=ray_tune.RunConfig(name=name, storage_path=storage, verbose=1))
        with ResourceWaitReporter():  # trials that cannot be placed: say what they wait for
            grid = tuner.fit()
        result = _finish(grid, parent=parent, space=space, base=base, metric=metric, mode=mode, n_train=n_train,
                         max_iterations=max_iterations, expected_trials=num_samples * space.grid_size(),
                         storage=storage, name=name, exp_path=exp_path, tracking_uri=tracking_uri,
                         experiment=experiment, register_best=register_best)
        result.restored = restored
    except BaseException as e:
        parent.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    parent.end("FINISHED" if result.complete else "KILLED")
    return result


def _finish(grid: Any, *, parent: Any, space: SearchSpace, base: Config, metric: str, mode: str, n_train: int,
            max_iterations: int, expected_trials: int, storage: str, name: str, exp_path: str, tracking_uri: str,
            experiment: str, register_best: Optional[str]) -> TuneResult:
    """Table, plot and best config into the parent run; close the children; maybe register."""
    from mlflow import MlflowClient
    from ray.tune import ExperimentAnalysis

    from pipelines.tracking_mlflow import ensure_experiment

    client = MlflowClient(tracking_uri=tracking_uri)
    children = client.search_runs([ensure_experiment(tracking_uri, experiment)],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=5000)
    run_ids = {c.data.tags.get(TRIAL_ID_TAG): c.info.run_id for c in children}
    # Tune returns from fit() on SIGINT too, with the state saved: read each trial's state back.
    tune_status = {t.trial_id: t.status for t in ExperimentAnalysis(exp_path).trials}
    rows = summarize(grid, base=base, metric=metric, mode=mode, train_samples=n_train, max_iterations=max_iterations,
                     run_ids=run_ids, tune_status=tune_status)
    complete = len(rows) >= expected_trials and not any(r.status == "unfinished" for r in rows)
    for row in rows:  # a trial ASHA stops is killed with its driver: its run was left RUNNING (or FAILED)
        if row.mlflow_run_id:
            client.set_tag(row.mlflow_run_id, "instalign.tune.status", row.status)
            client.set_terminated(row.mlflow_run_id, CHILD_STATUS[row.status])
    report_dir = Path(exp_path) if "://" not in storage else Path("tune_reports") / name
    report_dir.mkdir(parents=True, exist_ok=True)
    artifacts = write_table(rows, metric, report_dir)
    plot = report_dir / f"{metric.replace('@', '_')}_vs_params.png"
    artifacts.append(plot_metric_vs_params(rows, space, metric, plot))
    best = pick_best(rows, mode)
    best_config_path = None
    if best is not None:
        best_config_path = report_dir / "best_config.yaml"
        trial_config(base, best.params).to_yaml(best_config_path)
        artifacts.append(best_config_path)
        parent.set_tags({"instalign.tune.best_trial": best.trial_id, "instalign.tune.best_run_id": best.mlflow_run_id,
                         "instalign.tune.best_checkpoint": best.checkpoint_path or ""})
        parent.log_metrics({f"best_{metric}": best.best}, step=0)
    for path in artifacts:
        parent.log_artifact(path)
    parent.log_metrics({"trials": len(rows), "trials_stopped_early": sum(r.status == "stopped_early" for r in rows),
                        "trials_errored": sum(r.status == "error" for r in rows)}, step=0)
    registered = None
    if not complete:
        log.warning("search %s was interrupted: %d of %d trials ran, %d unfinished; the report so far is in %s. "
                    "Run the same command (same --name and --storage-path) to resume it.", name, len(rows),
                    expected_trials, sum(r.status == "unfinished" for r in rows), report_dir)
    elif register_best:
        if best is None or not best.checkpoint_path:
            raise RuntimeError(f"search {name!r}: no trial reported a checkpoint with a finite {metric}; "
                               "nothing to register")
        import mlflow
        from ray.train import Checkpoint

        from pipelines.pyfunc import log_and_register

        mlflow.set_tracking_uri(tracking_uri)
        status = client.get_run(best.mlflow_run_id).info.status
        with Checkpoint(best.checkpoint_path).as_directory() as ckpt_dir:
            version = log_and_register(ckpt_dir, registered_model_name=register_best, alias="candidate",
                                       run_id=best.mlflow_run_id)
        client.set_terminated(best.mlflow_run_id, status)  # logging the model reopened the child run
        registered = str(version.version)
        parent.set_tags({"instalign.tune.registered": f"{register_best}/{registered}"})
    return TuneResult(name=name, path=exp_path, parent_run_id=parent.run_id, tracking_uri=tracking_uri, metric=metric,
                      mode=mode, trials=rows, best=best, best_config_path=str(best_config_path) if best_config_path
                      else None, report_dir=str(report_dir), complete=complete, registered_version=registered,
                      artifacts=[str(a) for a in artifacts])


# --- CLI ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--space", required=True, help="a search-space YAML (tune_spaces/*.yaml)")
    a("--data", required=True, help="a prepared dataset directory or URI (instalign prepare)")
    a("--config", default=None, help="base config: a preset (paper, tiny) or YAML (default: the space's base)")
    a("--num-samples", type=int, default=None, help="trials (random/optuna, default 10) or grid repeats (default 1)")
    a("--max-concurrent", type=int, default=None, help="trials at once (default: as many as the cluster fits)")
    a("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    a("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU)")
    a("--cpus-per-worker", type=float, default=None, help="CPUs per worker (default: 1 with GPUs, else a share)")
    a("--address", default=None, help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001)")
    a("--metric", default="val_gIoU", choices=list(METRICS), help="validation metric to optimise")
    a("--mode", default="max", choices=["max", "min"])
    a("--name", default=None, help="search name; the same name (and storage path) again resumes it")
    a("--storage-path", default=None, help="Ray storage for the search and its trials' runs (./ray_results)")
    a("--experiment", default="instalign-tune", help="MLflow experiment")
    a("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    a("--register-best", default=None, metavar="MODEL_NAME", help="register the best trial's model (alias candidate)")
    a("--scheduler", default="asha", choices=list(SCHEDULERS), help="asha: stop weak trials early; none: run all")
    a("--max-iterations", type=int, default=None, help="ASHA max_t in epochs (default: the base config's epochs)")
    a("--grace-period", type=int, default=1, help="epochs every trial runs before ASHA may stop it")
    a("--reduction-factor", type=float, default=3.0, help="ASHA keeps 1/rf of the trials at each rung")
    a("--seed", type=int, default=0, help="searcher seed")
    a("--max-failures", type=int, default=1, help="worker-group restarts within a trial")
    a("--data-order", default="streaming", choices=["streaming", "ordered"])
    a("--resume-errored", action="store_true", help="on resume, re-run errored trials too")
    a("overrides", nargs="*", help="dotted overrides of the base config, e.g. train.epochs=4")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = tune(args.space, args.data, config=args.config, overrides=tuple(args.overrides),
                  num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                  workers_per_trial=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker,
                  cpus_per_worker=args.cpus_per_worker, address=args.address, metric=args.metric, mode=args.mode,
                  name=args.name, storage_path=args.storage_path, experiment=args.experiment,
                  tracking_uri=args.tracking_uri, register_best=args.register_best, scheduler=args.scheduler,
                  max_iterations=args.max_iterations, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, seed=args.seed, max_failures=args.max_failures,
                  data_order=args.data_order, resume_errored=args.resume_errored)
    best = result.best
    print(json.dumps({
        "name": result.name, "path": result.path, "restored": result.restored, "parent_run_id": result.parent_run_id,
        "complete": result.complete,
        "trials": {s: sum(r.status == s for r in result.trials) for s in CHILD_STATUS},
        "best": None if best is None else {"trial_id": best.trial_id, result.metric: best.best, "params": best.params,
                                           "checkpoint": best.checkpoint_path, "mlflow_run_id": best.mlflow_run_id},
        "best_config": result.best_config_path, "registered_version": result.registered_version,
        "report_dir": result.report_dir}, indent=2, default=str))
    if not result.complete:
        return 130  # interrupted, as a shell reports Ctrl-C
    return 0 if best is not None else 1
