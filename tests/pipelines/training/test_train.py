"""Ray Train + MLflow training, end to end on the tiny preset (real Ray, real MLflow, real files).

A 2-worker Train fit costs ~30 s on an idle 2-core machine, so one test does two fits and
checks everything it can on them: checkpoints, MLflow contents, disjoint shards, and that
re-running the same name resumes where the first run stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from instalign.config import ConfigError, load_config


def small_cfg(**train):
    """Tiny preset, 32 train samples → 4 steps per epoch at the global batch of 8."""
    overrides = ["data.max_train_samples=32", "data.max_val_samples=8", "data.num_overlays=2", "train.epochs=2",
                 "train.batch_size=8", "train.log_every_steps=1", "train.checkpoint_every_steps=2",
                 "train.keep_checkpoints=2", "loss.num_points=256"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config("tiny", overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "step" in r]


def test_cli_parses_and_routes_overrides():
    from pipelines.cli import build_parser

    args = build_parser("train").parse_args(
        ["train", "--config", "tiny", "--data", "/d", "--num-workers", "2", "--cpus-per-worker", "0.5",
         "--name", "r1", "--max-failures", "1", "--register-as", "m", "model.num_queries=4"])
    assert (args.num_workers, args.cpus_per_worker, args.name, args.max_failures) == (2, 0.5, "r1", 1)
    assert args.overrides == ["model.num_queries=4"] and args.gpus_per_worker is None
    assert load_config(args.config, args.overrides).model.num_queries == 4
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config("tiny", ["train.no_such_key=1"])


def test_loop_config_carries_the_dataclasses_through_rays_pickler():
    """``train_loop_config`` holds the ``Config`` and ``RunSpec`` themselves (no dict round trip);
    Ray sends it with its cloudpickle — the workers get equal objects."""
    import ray.cloudpickle

    from pipelines.training.worker import RunSpec, loop_config

    cfg = small_cfg()
    spec = RunSpec(run_name="x", data_dir="/d", steps_per_epoch=4, data_order="ordered")
    sent = loop_config(cfg, spec)
    assert sent["config"] is cfg and sent["run"] is spec
    back = ray.cloudpickle.loads(ray.cloudpickle.dumps(sent))
    assert back["config"] == cfg and type(back["config"].train.lr) is float
    assert back["run"] == spec


def test_production_settings_carry_no_test_hook():
    """A test's observer reaches the workers through ``INSTALIGN_WORKER_OBSERVER`` only: no field
    of the job's dataclasses and no argument of ``train`` exists for it."""
    import inspect
    from dataclasses import fields

    from pipelines.training.job import TrainJob
    from pipelines.training.train import train
    from pipelines.training.worker import RunSpec

    names = {f.name for f in fields(RunSpec)} | {f.name for f in fields(TrainJob)}
    assert not {n for n in names | set(inspect.signature(train).parameters) if "hook" in n}


def test_an_observer_named_in_the_environment_is_loaded_from_its_file(tmp_path):
    """What a worker does with ``INSTALIGN_WORKER_OBSERVER``: the test helper loaded by its path
    (workers cannot import ``tests``), built from its settings, watching like any observer."""
    from pipelines.training.observers import OBSERVER_ENV, Place, observer_from_env
    from tests.support.worker_hooks import CrashOnce, SampleLog, observing

    with observing(CrashOnce(5, tmp_path / "fired", then=SampleLog(tmp_path / "log"))) as value:
        assert os.environ[OBSERVER_ENV] == value
        observer = observer_from_env()
    assert OBSERVER_ENV not in os.environ and observer_from_env() is None
    assert type(observer).__module__ != "tests.support.worker_hooks"  # a fresh load of the file, as in a worker
    observer.started(Place(rank=1, world=2, node_ids=["n0", "n1"], device="cpu", precision="fp32"))
    observer.resumed("step_00000004", [("step_00000006", "truncated")])
    observer.batch(1, 5, ["a", "b"])
    assert read_jsonl(tmp_path / "log" / "rank1.jsonl") == [
        {"event": "start", "rank": 1, "world": 2, "node_id": "n1"},
        {"event": "resume", "rank": 1, "from": "step_00000004", "skipped": ["step_00000006"]},
        {"epoch": 1, "step": 5, "sample_ids": ["a", "b"]}]
    with pytest.raises(ValueError, match="expected WHERE:FACTORY"):
        observer_from_env("no-factory")
    with pytest.raises(ValueError, match="has no callable 'nothing'"):
        observer_from_env("json:nothing")


@pytest.mark.ray
def test_driver_rejects_bad_requests_before_starting_anything(prepared_dataset, tmp_path):
    from instalign.data.parquet import DatasetFormatError
    from pipelines.training.train import train

    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        train(small_cfg(), str(prepared_dataset), num_workers=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(small_cfg(batch_size=64), str(prepared_dataset), num_workers=1)
    with pytest.raises(DatasetFormatError, match="_manifest.json"):
        train(small_cfg(), str(tmp_path), num_workers=1)


@pytest.mark.ray
def test_two_worker_training_tracks_checkpoints_and_resumes(prepared_dataset, ray_local, tmp_path):
    from mlflow import MlflowClient

    from instalign.checkpoint import checkpoint_files
    from pipelines.training.train import train
    from tests.support.worker_hooks import SampleLog, observing

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kwargs = dict(num_workers=2, cpus_per_worker=0.5, name="job", storage_path=str(tmp_path / "ray"),
                  experiment="test-train", tracking_uri=store, max_failures=0)

    # --- first run: stops mid-epoch 1 at step 6 -------------------------------------------
    with observing(SampleLog(tmp_path / "s1")):
        first = train(small_cfg(max_steps=6), str(prepared_dataset), **kwargs)
    assert not first.resumed
    assert first.metrics["step"] == 6 and first.metrics["epoch"] == 1 and first.metrics["epoch_step"] == 2
    run_dir = Path(first.path)
    kept = sorted(p.name for p in run_dir.glob("step_*"))
    # top-2 by val gIoU of {2 (mid-epoch, NaN), 4 (epoch end), 6 (stop)}; the NaN one is dropped
    assert kept == ["step_00000004", "step_00000006"]
    assert Path(first.last_checkpoint).name == "step_00000006"
    checkpoint_files(first.last_checkpoint)
    state = json.loads((Path(first.last_checkpoint) / "training_state.json").read_text())["state"]
    assert (state["step"], state["epoch"], state["epoch_step"]) == (6, 1, 2)

    # every rank saw its own samples: disjoint within an epoch, per-worker batch = 8 / 2
    logs = [read_jsonl(tmp_path / "s1" / f"rank{r}.jsonl") for r in (0, 1)]
    for epoch in (0, 1):
        ids = [i for log in logs for rec in log if rec.get("epoch") == epoch for i in rec["sample_ids"]]
        assert len(ids) == len(set(ids)) == 8 * (4 if epoch == 0 else 2)
    assert all(len(rec["sample_ids"]) == 4 for log in logs for rec in log if "sample_ids" in rec)

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["instalign.run_name"] == "job"
    assert run.data.params["model.num_queries"] == "8" and run.data.params["run.num_workers"] == "2"
    assert run.data.params["run.steps_per_epoch"] == "4"
    assert len(run.data.tags["mlflow.source.git.commit"]) >= 7
    assert len(run.data.tags["instalign.dataset_manifest_sha256"]) == 64
    assert len(set(json.loads(run.data.tags["instalign.worker_nodes"]))) == 1
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    assert {"loss_merged", "loss_nt", "loss_inst", "lr", "grad_norm", "samples_per_s"} <= set(run.data.metrics)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_gIoU")) == [4, 6]
    # why the no-target head lags, at every validation: its ranking and where each class's scores lie
    # (NaN, so left out, where the 8 val samples hold one class only) and gIoU / cIoU per slice
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_nt_score_targeted_p50")) == [4, 6]
    slices = {k: run.data.metrics[f"val_{k}.samples"] for k in ("single", "multi", "no_target")}
    assert sum(slices.values()) == 8 and "val_single.gIoU" in run.data.metrics and "grad_clipped" in run.data.metrics
    assert ("val_nt_AUROC" in run.data.metrics) == ("val_nt_score_no_target_p50" in run.data.metrics) \
        == (0 < slices["no_target"] < 8)
    # the tiny preset's auto no-target weight: the number trained with, and how it was worked out
    assert float(run.data.params["loss.nt_pos_weight"]) > 0
    assert run.data.tags["instalign.derived.loss.nt_pos_weight"].startswith("auto: ")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset", "system_info.json", "overlays", "checkpoints"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "overlays/step_00000004")) == 2
    best = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
    assert "checkpoints/best/model.safetensors" in best and "checkpoints/best/training_state.json" not in best

    # --- the latest checkpoint is damaged (a truncated upload): resume skips it --------------
    state_file = Path(first.last_checkpoint) / "training_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:100])

    # --- the same name again, with a higher step budget: resumes at step 4, the last good one
    with observing(SampleLog(tmp_path / "s2")):
        second = train(small_cfg(max_steps=8), str(prepared_dataset), register_as="instalign-train-test", **kwargs)
    assert second.resumed and second.mlflow_run_id == first.mlflow_run_id and second.path == first.path
    assert second.metrics["step"] == 8 and second.metrics["epoch"] == 2 and second.metrics["epoch_step"] == 0
    resumes = [r for r in read_jsonl(tmp_path / "s2" / "rank0.jsonl") if r.get("event") == "resume"]
    assert resumes == [{"event": "resume", "rank": 0, "from": "step_00000004", "skipped": ["step_00000006"]}]
    assert steps_of(read_jsonl(tmp_path / "s2" / "rank0.jsonl")) == [5, 6, 7, 8]  # not from step 0, nor 6
    tags = client.get_run(first.mlflow_run_id).data.tags
    assert tags["instalign.resumed_from"] == "step_00000004"
    assert "training_state.safetensors" in json.loads(tags["instalign.skipped_checkpoints"])["step_00000006"]
    checkpoint_files(second.last_checkpoint)
    # Step 6 was trained again into a directory of its own: the damaged step_00000006 is still
    # registered with Ray, which may delete it, and two entries for one path would fail the run.
    assert Path(second.last_checkpoint).name == "step_00000008"
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.mlflow_run_id]  # one MLflow run for the job
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == list(range(1, 9))
    # The LR schedule continued from the checkpoint: linear decay over 2 epochs × 4 steps.
    cfg = small_cfg()
    lr7 = [m.value for m in client.get_metric_history(run.info.run_id, "lr") if m.step == 7]
    t = 7 / 8
    assert lr7 == [pytest.approx(cfg.train.lr * (1 - t) + cfg.train.min_lr * t, rel=1e-5)]
    assert run.data.params["train.max_steps"] == "6"  # params keep the first value...
    assert client.get_run(run.info.run_id).data.tags["instalign.param_changed.train.max_steps"] == "6 -> 8"
    # ...and the best checkpoint is registered with the alias "candidate".
    assert second.registered_version == "1"
    version = client.get_model_version_by_alias("instalign-train-test", "candidate")
    assert str(version.version) == "1" and version.run_id == first.mlflow_run_id
