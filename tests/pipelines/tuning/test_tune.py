"""``instalign tune``: searcher, scheduler and CLI (fast), then real searches — Ray Tune over
Ray Train on the tiny preset, MLflow in a temp store, ASHA, registry, resume.

The planning arithmetic is in ``test_resources.py``, the reports in ``test_report.py``,
a trial's reports and config in ``test_trial.py``."""

from __future__ import annotations

import sys

from pathlib import Path

import pytest
import yaml

from instalign.config import load_config

GOOD_LR, TINY_LR = 1e-2, 1e-9


# --- fast: no Ray cluster ------------------------------------------------------------------

def test_optuna_search_needs_the_extra(tmp_path, monkeypatch):
    from pipelines.tuning.tune import build_search_alg
    from pipelines.tuning.space import load_space

    path = tmp_path / "tpe.yaml"
    path.write_text("base: tiny\nsearch: optuna\nparams:\n  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n")
    space = load_space(path)
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    with pytest.raises(ImportError, match=r"tpe\.yaml: search=optuna needs Optuna.*instalign\[optuna\]"):
        build_search_alg(space, metric="val_gIoU", mode="max", seed=0, max_concurrent=2)


def test_random_and_grid_searchers_carry_the_concurrency_limit():
    """Tune ignores ``max_concurrent_trials`` beside a generator instance: the limit must be in it."""
    from pipelines.tuning.tune import build_search_alg
    from pipelines.tuning.space import load_space

    for name in ("loss_weights", "queries"):
        space = load_space(f"tune_spaces/{name}.yaml")
        assert build_search_alg(space, metric="val_gIoU", mode="max", seed=0, max_concurrent=3).max_concurrent == 3


def test_scheduler_arguments_are_checked():
    from pipelines.tuning.tune import build_scheduler

    assert type(build_scheduler("none", max_iterations=3, grace_period=1, reduction_factor=2)).__name__ == \
        "FIFOScheduler"
    with pytest.raises(ValueError, match="grace period 4"):
        build_scheduler("asha", max_iterations=3, grace_period=4, reduction_factor=2)
    with pytest.raises(ValueError, match="scheduler='hyperband'"):
        build_scheduler("hyperband", max_iterations=3, grace_period=1, reduction_factor=2)


def test_shipped_spaces_become_tune_domains():
    from ray.tune.search.sample import Domain

    from pipelines.tuning.space import load_space

    lw = load_space("tune_spaces/loss_weights.yaml").to_param_space()
    assert set(lw) == {f"loss.{k}_weight" for k in ("merged", "inst", "nt", "score", "mask", "phrase")}
    assert all(isinstance(d, Domain) and 0.025 <= d.lower < d.upper <= 20.0 for d in lw.values())
    grid = load_space("tune_spaces/ablations_grid.yaml").to_param_space()
    assert grid["model.decoder"] == {"grid_search": ["pot", "mask2former", "rela"]}
    rows = load_space("tune_spaces/ablations.yaml").to_param_space()
    assert list(rows) == ["row"] and len(rows["row"]["grid_search"]) == 13  # Table 3, one trial per row


def test_cli_parses_the_documented_options():
    from pipelines.cli import build_parser

    args = build_parser("tune").parse_args(
        ["tune", "--space", "tune_spaces/loss_weights.yaml", "--data", "/d", "--config", "tiny", "--num-samples", "4",
         "--max-concurrent", "2", "--workers-per-trial", "2", "--gpus-per-worker", "1", "--cpus-per-worker", "2",
         "--metric", "val_cIoU", "--mode", "max", "--name", "s1", "--storage-path", "/r", "--experiment", "e",
         "--register-best", "m", "--max-iterations", "6", "--grace-period", "2", "--reduction-factor", "2",
         "train.epochs=6"])
    assert (args.num_samples, args.max_concurrent, args.workers_per_trial, args.gpus_per_worker) == (4, 2, 2, 1.0)
    assert (args.metric, args.name, args.register_best, args.max_iterations, args.grace_period) == \
        ("val_cIoU", "s1", "m", 6, 2)
    assert args.overrides == ["train.epochs=6"] and args.scheduler == "asha"


# --- a real search -------------------------------------------------------------------------

#: ``loss.nt_pos_weight=1.0``: the tiny preset's ``auto`` class weight (≈2 on this data) makes 4
#: steps at lr 1e-2 answer "no target" for all 8 targeted val samples (gIoU 0, as the lr=1e-9
#: trials), which leaves ASHA nothing to tell apart at its first rung; plain BCE does not.
BASE_OVERRIDES = ["data.max_train_samples=32", "data.max_val_samples=8", "data.num_overlays=0", "train.epochs=2",
                  "train.batch_size=8", "train.min_lr=0.0", "train.log_every_steps=1", "loss.num_points=256",
                  "loss.nt_pos_weight=1.0"]


@pytest.mark.ray
@pytest.mark.slow
def test_asha_search_tracks_trials_registers_the_best_and_resumes(prepared_dataset, ray_local, tmp_path, caplog,
                                                                   capfd):
    """4 trials × 2 epochs × 8 steps of 4 samples, one 0.45-CPU worker each, 2 at a time (grid
    order: the two lr=1e-2 trials first). The lr=1e-9 trials cannot move the weights: their val
    gIoU stays the initial model's, 0 on these 8 targeted samples (it calls every sample
    no-target); after a few steps at 1e-2 the model predicts targets (gIoU 19–31 in 4 of 4
    offline runs at 4 steps of 8, nt_weight 0.5; one of two trials still at 0 after 4 steps in
    one run: 8 smaller steps make that rarer at the same cost). The first lr=1e-9 trial reaches ASHA's first rung (grace 1, rate 2) after
    both others recorded there, and is stopped unless both of them also scored 0. While it runs,
    the driver prints Tune's trial table and logs each result beside the best trial so far."""
    import logging

    from mlflow import MlflowClient

    from pipelines.tuning.tune import tune
    from pipelines.tuning.report import CHILD_STATUS
    from pipelines.tuning.space import trial_config
    from pipelines.tuning.trial import TRIAL_ID_TAG

    space = tmp_path / "lr.yaml"
    space.write_text(yaml.safe_dump({"base": "tiny", "search": "grid", "params": {
        "train.lr": {"type": "grid", "values": [GOOD_LR, TINY_LR]},
        "loss.nt_weight": {"type": "grid", "values": [0.5, 1.0]}}}))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = (*BASE_OVERRIDES, "train.batch_size=4")
    kwargs = dict(config="tiny", overrides=overrides, max_concurrent=2, workers_per_trial=1,
                  cpus_per_worker=0.45, name="lr-search", storage_path=str(tmp_path / "ray"), experiment="test-tune",
                  tracking_uri=store, scheduler="asha", max_iterations=2, grace_period=1, reduction_factor=2,
                  max_failures=1)
    caplog.set_level(logging.INFO, logger="pipelines")
    result = tune(str(space), str(prepared_dataset), register_best="tune-best", **kwargs)

    rows = {r.trial_id: r for r in result.trials}
    # What the user saw: the device, Tune's table, and a best-so-far line per validated result.
    assert "each trial trains on CPU: 1 worker × 0.45 CPU (the cluster has no GPUs; 2 CPUs), up to 2 trials at once" \
        in caplog.messages
    table = capfd.readouterr().out
    assert "Trial status:" in table and "Current best trial:" in table and "train.lr" in table
    best_lines = [m for m in caplog.messages if "| best so far: trial " in m]
    assert len(best_lines) == sum(r.iterations for r in rows.values())  # one per validated epoch, no repeats
    assert best_lines[-1].split("| best so far: ")[1].startswith(
        f"trial {result.best.trial_id} val_gIoU {result.best.best:.2f} (epoch {result.best.best_iteration}")
    assert len(rows) == 4 and not [r for r in rows.values() if r.status == "error"], [r.error for r in rows.values()]
    stopped = [r for r in rows.values() if r.status == "stopped_early"]
    assert stopped and all(r.iterations == 1 for r in stopped)
    assert all(r.iterations == 2 for r in rows.values() if r.status == "completed")
    assert result.best.params["train.lr"] == GOOD_LR and result.best.checkpoint_path
    tiny_lr = [r.best for r in rows.values() if r.params["train.lr"] == TINY_LR]
    assert result.best.best > max(tiny_lr)

    # The best config: a complete training config with the best trial's values.
    best_cfg = load_config(result.best_config_path)
    assert best_cfg == trial_config(load_config("tiny", list(overrides)), result.best.params)
    assert best_cfg.train.lr == GOOD_LR and best_cfg.loss.nt_weight == result.best.params["loss.nt_weight"]

    # MLflow: the parent holds the search; each trial's training run is its child.
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["instalign.kind"] == "tune"
    assert parent.data.metrics["best_val_gIoU"] == pytest.approx(result.best.best)
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "trials.json", "val_gIoU_vs_params.png", "best_config.yaml", "search"} <= artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(c.data.tags[TRIAL_ID_TAG] for c in children) == sorted(rows)
    for child in children:
        row = rows[child.data.tags[TRIAL_ID_TAG]]
        assert child.info.status == CHILD_STATUS[row.status]
        assert float(child.data.params["train.lr"]) == row.params["train.lr"]
        assert float(child.data.params["loss.nt_weight"]) == row.params["loss.nt_weight"]
        # A stopped trial may validate once more before its kill lands: Tune saw its first rows only.
        val = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "val_gIoU"), key=lambda m: m.step)]
        assert len(val) >= row.iterations and max(val[:row.iterations]) == pytest.approx(row.best)
        assert client.get_metric_history(child.info.run_id, "loss")  # per-step training metrics from rank 0

    version = client.get_model_version_by_alias("tune-best", "candidate")
    assert version.run_id == result.best.mlflow_run_id and result.registered_version == str(version.version)

    # The same name again restores the finished search: nothing re-runs, same parent run.
    again = tune(str(space), str(prepared_dataset), **kwargs)
    assert again.restored and again.parent_run_id == result.parent_run_id
    assert {r.trial_id: (r.status, r.best) for r in again.trials} == {k: (r.status, r.best) for k, r in rows.items()}
    assert len(client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")) == 4
    # ...but a different search under that name is refused before anything runs.
    with pytest.raises(ValueError, match="'lr-search' already exists .* choose a new --name"):
        tune(str(space), str(prepared_dataset), **{**kwargs, "overrides": (*overrides, "train.epochs=3")})


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_search_resumes_where_it_stopped(prepared_dataset, ray_local, tmp_path):
    """SIGUSR1 (Tune's graceful stop, as Ctrl-C) once the first of two trials has validated its
    first epoch; the same call again restores the search. The interrupted trial's Train run
    resumes from its checkpoint — no epoch is validated twice and its iteration count goes on
    from the epochs it had — and the trial that never started runs."""
    import os
    import signal
    import threading
    import time

    from mlflow import MlflowClient

    from pipelines.tuning.tune import tune
    from pipelines.tuning.trial import TRIAL_ID_TAG

    space = tmp_path / "nt.yaml"
    space.write_text(yaml.safe_dump({"base": "tiny", "search": "grid", "params": {
        "loss.nt_weight": {"type": "grid", "values": [0.5, 1.0]}}}))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = dict(config="tiny", overrides=(*BASE_OVERRIDES, f"train.lr={GOOD_LR}"), max_concurrent=1,
                  workers_per_trial=1, cpus_per_worker=0.45, name="nt-search", storage_path=str(tmp_path / "ray"),
                  experiment="test-tune-resume", tracking_uri=store, scheduler="none", max_failures=0)
    done = threading.Event()

    import ray

    def interrupt_after_first_result():
        # Tune's CSV logger writes a trial's progress.csv in the driver's staging directory (Ray's
        # session dir) as each result is processed; the copy under storage_path is synced later —
        # after the trial ended, on a loaded machine — so both places are watched.
        staged = Path(ray._private.worker._global_node.get_session_dir_path()) / "artifacts"
        stored = tmp_path / "ray" / "nt-search"
        while not done.is_set():
            csvs = [*stored.glob("*/progress.csv"), *staged.glob("*/nt-search/driver_artifacts/*/progress.csv")]
            if any(len(p.read_text().splitlines()) >= 2 for p in csvs):
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=interrupt_after_first_result, daemon=True)
    watcher.start()
    try:
        first = tune(str(space), str(prepared_dataset), **kwargs)
    finally:
        done.set()
        watcher.join()
    assert not first.complete and [r.status for r in first.trials] == ["unfinished"]
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(first.parent_run_id).info.status == "KILLED"

    second = tune(str(space), str(prepared_dataset), **kwargs)
    assert second.restored and second.complete and second.parent_run_id == first.parent_run_id
    assert [(r.status, r.iterations) for r in second.trials] == [("completed", 2), ("completed", 2)]
    assert client.get_run(second.parent_run_id).info.status == "FINISHED"
    resumed = next(r for r in second.trials if r.trial_id == first.trials[0].trial_id)
    history = client.get_metric_history(resumed.mlflow_run_id, "val_gIoU")
    assert sorted(m.step for m in history) == [4, 8]  # resumed from its checkpoint, not retrained
    assert client.get_run(resumed.mlflow_run_id).data.tags[TRIAL_ID_TAG] == resumed.trial_id
