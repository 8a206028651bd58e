"""What a search shows while it runs, and what it leaves behind: the table of trials, the plot,
the best config, the registered model.

While it runs, Tune's own reporter prints the trial table (``RunConfig(verbose=1)``: every
30 s and at the end), and :class:`BestSoFar` logs one line per validated trial result with the
best trial so far — in the terminal and in ``ray job logs`` alike.

After ``Tuner.fit`` returns (finished, or interrupted with its state saved), :func:`finish_search`
reads every trial back (:func:`summarize`: best and last metric, iterations, status — completed,
stopped early by ASHA, errored or unfinished), closes each trial's MLflow child run with the
matching status (:data:`CHILD_STATUS`), and writes into the search's parent run:

* ``trials.csv`` / ``trials.json`` — one row per trial, one column per hyper-parameter;
* ``<metric>_vs_params.png`` — each trial's best metric against each hyper-parameter;
* ``best_config.yaml`` — the best trial's complete config, for ``instalign train --config``;
* for a ``search: rows`` space, the Table 3 report (``pipelines.tuning.table3``: ``table3.md``,
  ``table3.csv``, ``table3_trials.csv``, ``table3_gIoU.png``), read back from the child runs;

and, for a complete search with ``--register-best``, registers the best trial's best
checkpoint (``pipelines.models.pyfunc.log_and_register``, alias ``candidate``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from instalign.config import Config
from pipelines.tuning.space import SearchSpace, trial_config
from pipelines.tuning.trial import TRIAL_ID_TAG

log = logging.getLogger(__name__)

#: MLflow status of a trial's child run by its outcome (``unfinished``: the search was
#: interrupted; the same command again resumes the trial and reopens its run).
CHILD_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED", "unfinished": "KILLED"}
_TRIAL_DIR_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


class BestSoFar(Callback):
    """Log each trial result beside the best trial so far (a Tune driver callback).

    ``trial 1a2b3_00001 epoch 2: val_gIoU 31.20 | best so far: trial 1a2b3_00000 val_gIoU 35.10
    (epoch 2; train.lr=0.01, loss.nt_weight=0.5)``. Tune's table says the same every 30 s; this
    line marks the moment a trial reports, so a long search can be followed line by line.
    Results without a finite ``metric`` are skipped (``tune_trial`` forwards validated ones only),
    and so is a trial's last result repeated (``tune_trial.trial_driver`` reports it once more).
    """

    def __init__(self, metric: str, mode: str, logger: logging.Logger = log) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r}: expected max or min")
        self.metric, self.mode, self.log = metric, mode, logger
        self.best: Optional[tuple[float, str, int, dict[str, Any]]] = None  # value, trial, iteration, params
        self._said: dict[str, tuple[int, float]] = {}  # trial → the (epoch, value) last logged

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        epoch = int(result.get("training_iteration", 0))
        if self._said.get(trial.trial_id) == (epoch, float(value)):
            return  # a trial's final state, reported once more when its run ends
        self._said[trial.trial_id] = (epoch, float(value))
        if self._better(value):
            self.best = (float(value), trial.trial_id, epoch, dict(trial.config or {}))
        self.log.info(self.line(trial.trial_id, epoch, float(value)))

    def line(self, trial_id: str, epoch: int, value: float) -> str:
        assert self.best is not None
        best, best_id, best_epoch, params = self.best
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
        return (f"trial {trial_id} epoch {epoch}: {self.metric} {value:.2f} | best so far: trial {best_id} "
                f"{self.metric} {best:.2f} (epoch {best_epoch}{'; ' + shown if shown else ''})")


def expected_iterations(cfg: Config, train_samples: int, max_iterations: int) -> int:
    """Tune iterations (validations) a trial of ``cfg`` runs unless stopped early."""
    steps_per_epoch = max(1, train_samples // cfg.train.batch_size)
    total = cfg.train.epochs * steps_per_epoch
    steps = min(cfg.train.max_steps or total, total)
    return min(math.ceil(steps / steps_per_epoch), max_iterations)


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
        # A trial that never started (a search interrupted before it) has no config yet.
        rows.append(TrialRow(trial_id=trial_id, status=status, params=dict(r.config or {}), iterations=iterations,
                             best=best, last=last, best_iteration=best_it, checkpoint_path=ckpt,
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


def finish_search(grid: Any, *, parent: Any, space: SearchSpace, base: Config, metric: str, mode: str, n_train: int,
            max_iterations: int, expected_trials: int, storage: str, name: str, exp_path: str, tracking_uri: str,
            experiment: str, register_best: Optional[str]) -> TuneResult:
    """Table, plot and best config into the parent run; close the children; maybe register."""
    from mlflow import MlflowClient
    from ray.tune import ExperimentAnalysis

    from pipelines.core.tracking import ensure_experiment

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
    if space.search == "rows":  # after the status tags above: the report counts completed trials only
        from pipelines.tuning.table3 import write_table3

        artifacts += write_table3(client, parent.run_id, space, report_dir)
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

        from pipelines.models.registry import log_and_register

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
