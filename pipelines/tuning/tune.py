"""``instalign tune``: hyper-parameter search over InstAlign training on Ray Tune (DESIGN §5, §6.8).

The search space is a YAML file of ``tune_spaces/`` (``pipelines.tuning.space``): dotted keys of
``instalign.config.Config`` — the loss weights of eqs. 5–7 and 13, the query count N, the
Table 3 switches — each with a distribution. The search's driver, :func:`tune`:

* checks the base config, the space and every value it can take against the dataset
  (``pipelines.training.job.plan_data``) before any cluster starts;
* plans the trials' resources (``pipelines.core.resources``): ``max_concurrent × (TRIAL_CPU +
  workers × CPUs per worker)`` must leave a whole CPU for the Ray Data tasks that read the
  data (else the runs hang), and GPUs must suffice for the workers of every concurrent trial;
* opens the MLflow parent run (settings, the space, the base config) and runs Tune with a
  searcher (:func:`build_search_alg`) and ASHA or FIFO (:func:`build_scheduler`); each trial
  is a training job of its own (``pipelines.tuning.trial``), an MLflow child run;
* writes the reports and registers the best model (``pipelines.tuning.report``).

**ASHA** (``AsyncHyperBandScheduler``) stops a trial whose metric at a rung (grace·rfᵏ
epochs) is below the ``1 - 1/rf`` quantile of the trials recorded there before it.
``--scheduler none`` runs every trial to the end (Table 3, whose rows must be complete).

**Resume.** The same ``--name`` (and storage path) again restores the search
(``Tuner.restore``): finished trials are kept, unfinished ones run again, and each of those
resumes its Train run from its latest checkpoint (same run name). The MLflow parent run
is found again by name, and a different search under the same name is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from instalign.config import Config, load_config
from pipelines.core import flags
from pipelines.training.job import check_data_order, count_samples, plan_data
from pipelines.core.resources import (TRIAL_CPU, WorkerResources, absolute_data_dir, cluster_totals, default_cpus_per_worker,
                                 describe_workers, join_storage, plan_concurrency, resolve_gpus_per_worker,
                                 storage_root)
from pipelines.tuning.report import CHILD_STATUS, BestSoFar, TuneResult, finish_search
from pipelines.tuning.space import SearchSpace, load_space, trial_config
from pipelines.tuning.trial import TrialSettings, trial_driver

log = logging.getLogger(__name__)

METRICS = ("val_gIoU", "val_cIoU", "val_N_acc", "val_T_acc", "val_Pr@0.7", "val_Pr@0.8", "val_Pr@0.9")
SCHEDULERS = ("asha", "none")
SEARCH_FINGERPRINT_TAG = "instalign.tune.fingerprint"


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


def _fingerprint(space_path: str, base: Config, settings: dict[str, Any]) -> str:
    text = Path(space_path).read_text() + base.to_yaml() + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_trials(space: SearchSpace, base: Config, data_dir: str, manifest: dict[str, Any], num_workers: int) -> int:
    """Every value of the space must give a runnable trial (``pipelines.training.job.plan_data``), checked
    before anything starts; returns the base config's train samples."""
    d = base.data
    count_samples(manifest, d.val_split, d.max_val_samples, data_dir)
    n_train = count_samples(manifest, d.train_split, d.max_train_samples, data_dir)
    for p in space.params:
        for value in p.candidates():
            try:
                plan_data(trial_config(base, {p.key: value}), data_dir, manifest, num_workers)
            except ValueError as e:
                raise ValueError(f"{space.path}: {p.key}={value!r}: {e}") from None
    return n_train


def plan_trials(*, workers_per_trial: int, gpus_per_worker: Optional[float], cpus_per_worker: Optional[float],
                max_concurrent: Optional[int], joined: bool,
                cluster: Optional[dict[str, float]] = None) -> tuple[WorkerResources, int]:
    """Each trial's worker resources and the trials run at once, on ``cluster`` (default: the connected one).

    GPU workers when the cluster has GPUs and ``gpus_per_worker`` is None
    (``pipelines.core.resources.resolve_gpus_per_worker``). The default CPU share
    (``pipelines.core.resources.default_cpus_per_worker``) is sized for ``max_concurrent`` trials —
    one on CPUs unless asked. On a ``joined`` cluster that does not fit yet, an explicit
    ``max_concurrent`` goes ahead with a warning: an autoscaler may add nodes.
    """
    totals = cluster_totals() if cluster is None else cluster
    total_cpus, total_gpus = float(totals.get("CPU", 0)), float(totals.get("GPU", 0))
    gpus_per_worker = resolve_gpus_per_worker(gpus_per_worker, total_gpus)
    use_gpu = gpus_per_worker > 0
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(workers_per_trial, total_cpus=total_cpus, use_gpu=use_gpu,
                                                  concurrent=max_concurrent or 1, driver_cpus=TRIAL_CPU)
        if not use_gpu and max_concurrent is None:
            max_concurrent = 1  # the derived CPU share is sized for one trial at a time
    resources = WorkerResources(num_workers=workers_per_trial, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                                gpus_per_worker=gpus_per_worker if use_gpu else 0.0)
    try:
        concurrency = plan_concurrency(total_cpus=total_cpus, total_gpus=total_gpus, num_workers=workers_per_trial,
                                       cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                       max_concurrent=max_concurrent)
    except ValueError as e:
        if not joined:
            raise
        if max_concurrent is None:
            raise ValueError(f"{e} On an autoscaling cluster pass --max-concurrent (and --cpus-per-worker): "
                             "what it has now is not what it can grow to.") from None
        log.warning("%s — going ahead on a joined cluster that may still scale up", e)
        concurrency = max_concurrent
    return resources, concurrency


def seeded_space(space: SearchSpace, seeds: int, base: Config, *, scheduler: str,
                 num_samples: Optional[int]) -> SearchSpace:
    """``--seeds``: every row of a rows space ``seeds`` times (``SearchSpace.with_seeds``), from the
    base config's ``train.seed``. Refused with ASHA — a row stopped early is not the row, and a
    seed stopped early is no replicate — and beside ``--num-samples``, which would repeat seeds."""
    seeded = space.with_seeds(seeds, base.train.seed)  # first: a space that is not rows says so
    if scheduler != "none":
        raise ValueError(f"--seeds {seeds}: Table 3's replicates must each train to the end; "
                         "add --scheduler none")
    if num_samples not in (None, 1):
        raise ValueError(f"--seeds {seeds}: the seeds are the repeats; drop --num-samples {num_samples}")
    return seeded


# --- the driver -----------------------------------------------------------------------------

def tune(space_path: str, data_dir: str, *, config: Any = None, overrides: tuple[str, ...] = (),
         num_samples: Optional[int] = None, max_concurrent: Optional[int] = None, workers_per_trial: int = 1,
         gpus_per_worker: Optional[float] = None, cpus_per_worker: Optional[float] = None,
         address: Optional[str] = None,
         metric: str = "val_gIoU", mode: str = "max", name: Optional[str] = None, storage_path: Optional[str] = None,
         experiment: str = "instalign-tune", tracking_uri: Optional[str] = None, register_best: Optional[str] = None,
         scheduler: str = "asha", max_iterations: Optional[int] = None, grace_period: int = 1,
         reduction_factor: float = 3.0, seed: int = 0, max_failures: int = 1, data_order: str = "streaming",
         resume_errored: bool = False, seeds: Optional[int] = None) -> TuneResult:
    """Search ``space_path`` over trainings on ``data_dir``; resume if ``name`` ran before.

    Args:
        config: the base config — a preset name, YAML path or ``Config`` (default: the space's ``base``).
        overrides: dotted overrides of the base config (``train.epochs=4``).
        num_samples: trials (random/optuna; default 10), or repeats of the whole grid (default 1).
        max_concurrent: trials at once (default: as many as fit, :func:`plan_concurrency`).
        workers_per_trial / gpus_per_worker / cpus_per_worker: each trial's Ray Train run; GPUs
            when ``gpus_per_worker > 0``, or when it is None (the default) and the cluster has
            GPUs; CPUs default to 1 per GPU worker, or what leaves room for data for
            ``max_concurrent`` (default 1) CPU trials. The device is logged at the start.
        metric / mode: what ASHA and the best trial are judged by (a ``val_`` metric).
        name / storage_path: the search (Tune experiment ``<storage>/<name>``); the same name resumes.
        experiment / tracking_uri: MLflow experiment and store (default ``./mlflow.db``).
        register_best: register the best trial's best checkpoint under this model name.
        scheduler: ``asha`` or ``none``; max_iterations (default: the base config's epochs),
            grace_period, reduction_factor: ASHA's ``max_t``, grace period and rate (in epochs).
        seed: the searcher's seed (random sampling, TPE).
        max_failures: worker-group restarts within a trial's Train run.
        data_order: ``streaming`` or ``ordered`` (``pipelines.training.worker``).
        resume_errored: on resume, also re-run trials that errored.
        seeds: a ``search: rows`` space only (Table 3, ``pipelines.tuning.table3``): every row runs
            ``seeds`` trials with ``train.seed`` = the base's, +1, …; needs ``scheduler="none"``
            and no ``num_samples`` (the seeds are the repeats).
    """
    from ray import tune as ray_tune

    from instalign.data.parquet import read_manifest
    from pipelines.core import ray_cluster
    from pipelines.core.tracking import (MlflowTracker, ensure_experiment, find_run, resolve_tracking_uri,
                                           start_or_resume_run)

    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: Tune sees the validation metrics only; expected one of {METRICS}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: expected max or min")
    data_order = check_data_order(data_order)
    if workers_per_trial < 1:
        raise ValueError(f"workers_per_trial must be >= 1, got {workers_per_trial}")
    if config is None:
        import yaml

        raw = yaml.safe_load(Path(space_path).read_text()) if Path(space_path).is_file() else None
        config = str(raw.get("base", "paper")) if isinstance(raw, dict) else "paper"
    base = load_config(config, list(overrides))
    space = load_space(space_path, base)
    if seeds is not None:
        space = seeded_space(space, seeds, base, scheduler=scheduler, num_samples=num_samples)
    data_dir = absolute_data_dir(data_dir)
    manifest = read_manifest(data_dir)
    n_train = check_trials(space, base, data_dir, manifest, workers_per_trial)
    max_iterations = max_iterations or max([base.train.epochs] + [
        int(v) for p in space.params if p.key == "train.epochs" for v in p.candidates()])
    num_samples = num_samples or (1 if space.is_grid else 10)
    if space.search == "optuna":
        require_optuna(space)  # before any cluster starts
    sched = build_scheduler(scheduler, max_iterations=max_iterations, grace_period=grace_period,
                            reduction_factor=reduction_factor)

    ray_cluster.init_ray(address)
    cluster = cluster_totals()
    resources, concurrency = plan_trials(workers_per_trial=workers_per_trial, gpus_per_worker=gpus_per_worker,
                                         cpus_per_worker=cpus_per_worker, max_concurrent=max_concurrent,
                                         joined=bool(address), cluster=cluster)
    log.info("%s, up to %d trial%s at once", describe_workers(resources, cluster, requested_gpus=gpus_per_worker,
                                                             what="each trial trains"),
             concurrency, "s" if concurrency != 1 else "")
    cpus_per_worker, gpus_per_worker = resources.cpus_per_worker, resources.gpus_per_worker

    name = name or f"tune-{Path(space_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_root(storage_path)
    exp_path = join_storage(storage, name)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    settings = dict(space=str(Path(space_path).resolve()), search=space.search, num_samples=num_samples,
                    metric=metric, mode=mode, scheduler=scheduler, max_iterations=max_iterations,
                    grace_period=grace_period, reduction_factor=reduction_factor, seed=seed,
                    workers_per_trial=workers_per_trial, gpus_per_worker=gpus_per_worker,
                    cpus_per_worker=cpus_per_worker, data_dir=data_dir, data_order=data_order)
    if seeds is not None:  # only then: an unseeded search keeps the fingerprint it resumes by
        settings["seeds"] = seeds
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
            search_name=name, base=base, data_dir=data_dir, manifest=manifest, tracking_uri=tracking_uri,
            experiment=experiment, parent_run_id=parent_id, resources=resources, storage_path=storage,
            max_failures=max_failures, data_order=data_order, metric=metric)
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
                run_config=ray_tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                              callbacks=[BestSoFar(metric, mode)]))
        with ray_cluster.ResourceWaitReporter():  # trials that cannot be placed: say what they wait for
            grid = tuner.fit()
        result = finish_search(grid, parent=parent, space=space, base=base, metric=metric, mode=mode, n_train=n_train,
                         max_iterations=max_iterations, expected_trials=num_samples * space.grid_size(),
                         storage=storage, name=name, exp_path=exp_path, tracking_uri=tracking_uri,
                         experiment=experiment, register_best=register_best)
        result.restored = restored
    except BaseException as e:
        parent.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    parent.end("FINISHED" if result.complete else "KILLED")
    return result


# --- CLI ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--space", required=True, help="a search-space YAML (tune_spaces/*.yaml)")
    flags.add_data(parser)
    flags.add_config(parser, default=None,
                     help="base config: a preset (paper, tiny) or YAML (default: the space's base)")
    a("--num-samples", type=int, default=None, help="trials (random/optuna, default 10) or grid repeats (default 1)")
    a("--max-concurrent", type=int, default=None, help="trials at once (default: as many as the cluster fits)")
    a("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    flags.add_worker_resources(parser)
    flags.add_address(parser)
    a("--metric", default="val_gIoU", choices=list(METRICS), help="validation metric to optimise")
    a("--mode", default="max", choices=["max", "min"])
    flags.add_run_name(parser, what="search")
    flags.add_tracking(parser, experiment="instalign-tune")
    a("--register-best", default=None, metavar="MODEL_NAME", help="register the best trial's model (alias candidate)")
    a("--scheduler", default="asha", choices=list(SCHEDULERS), help="asha: stop weak trials early; none: run all")
    a("--max-iterations", type=int, default=None, help="ASHA max_t in epochs (default: the base config's epochs)")
    a("--grace-period", type=int, default=1, help="epochs every trial runs before ASHA may stop it")
    a("--reduction-factor", type=float, default=3.0, help="ASHA keeps 1/rf of the trials at each rung")
    a("--seed", type=int, default=0, help="searcher seed")
    flags.add_max_failures(parser, default=1)
    flags.add_data_order(parser)
    a("--resume-errored", action="store_true", help="on resume, re-run errored trials too")
    a("--seeds", type=int, default=None, metavar="K",
      help="search: rows spaces only (Table 3): K trials a row, train.seed = base, base+1, …; "
           "writes table3.md/.csv/_gIoU.png (mean ± std, Δ to the reference row); needs --scheduler none")
    flags.add_overrides(parser, help="dotted overrides of the base config, e.g. train.epochs=4")


def run(args: argparse.Namespace) -> int:
    flags.setup_logging(args.log_level)
    result = tune(args.space, args.data, config=args.config, overrides=tuple(args.overrides),
                  num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                  workers_per_trial=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker,
                  cpus_per_worker=args.cpus_per_worker, address=args.address, metric=args.metric, mode=args.mode,
                  name=args.name, storage_path=args.storage_path, experiment=args.experiment,
                  tracking_uri=args.tracking_uri, register_best=args.register_best, scheduler=args.scheduler,
                  max_iterations=args.max_iterations, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, seed=args.seed, max_failures=args.max_failures,
                  data_order=args.data_order, resume_errored=args.resume_errored, seeds=args.seeds)
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
