"""MlflowTracker and the driver-side run bookkeeping, against a real sqlite MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from instalign.tracking import NullTracker, Tracker, finite_metrics
from pipelines.core.tracking import (
    RUN_NAME_TAG,
    MlflowTracker,
    default_artifact_location,
    metric_key,
    resolve_tracking_uri,
    start_or_resume_run,
)


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_resolve_tracking_uri_is_absolute_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert default_artifact_location(uri) == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert default_artifact_location("http://127.0.0.1:5000") is None


def test_metric_key_sanitises_only_illegal_characters():
    assert metric_key("Pr@0.7") == "Pr_0.7"
    assert metric_key("val/gIoU") == "val/gIoU"
    assert metric_key("loss_mask_3") == "loss_mask_3"


def test_one_run_per_name_and_tracker_logs_everything(store, tmp_path):
    from mlflow import MlflowClient

    run_id, resumed = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="job-1",
                                          tags={"k": "v"})
    assert not resumed
    tracker = MlflowTracker(run_id=run_id, tracking_uri=store)
    assert isinstance(tracker, Tracker)
    tracker.log_params({"model.num_queries": 8, "model.backbone.kwargs": {"depths": [1, 1]}, "x": "a"})
    tracker.log_metrics(finite_metrics({"train/loss": 1.5, "train/nan_metric": float("nan"), "train/Pr@0.7": 0.25}), 3)
    tracker.log_metrics({"loss": 1.0}, step=4)
    (tmp_path / "cfg.yaml").write_text("a: 1\n")
    tracker.log_artifact(tmp_path / "cfg.yaml")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f.txt").write_text("hi")
    tracker.log_artifact(tmp_path / "dir", artifact_path="bundle")
    tracker.log_image(np.zeros((8, 8, 3), dtype=np.uint8), "overlays/epoch_000/0.png")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tracker.log_artifact(tmp_path / "missing.txt")
    tracker.close()  # a worker-side tracker does not end the run

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags[RUN_NAME_TAG] == "job-1" and run.data.tags["k"] == "v"
    assert run.data.params["model.num_queries"] == "8"
    assert run.data.params["model.backbone.kwargs"] == '{"depths": [1, 1]}'
    assert run.data.metrics["train/Pr_0.7"] == 0.25
    assert "train/nan_metric" not in run.data.metrics
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(3, 1.5)]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"cfg.yaml", "bundle", "overlays"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "overlays/epoch_000")] == ["overlays/epoch_000/0.png"]

    # The same name again (a resumed job) reopens the same run; changed params keep their
    # first value and are flagged, new ones are added.
    client.set_terminated(run_id, "FAILED")
    again, resumed = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="job-1")
    assert (again, resumed) == (run_id, True)
    owner = MlflowTracker(run_id=again, tracking_uri=store, owns_run=True)
    owner.log_params({"model.num_queries": 16, "train.max_steps": 9})
    owner.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_queries"] == "8" and run.data.params["train.max_steps"] == "9"
    assert run.data.tags["instalign.param_changed.model.num_queries"] == "8 -> 16"
    # A different name is a different run.
    other, resumed = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="job-2")
    assert other != run_id and not resumed


def test_null_tracker_is_a_tracker():
    assert isinstance(NullTracker(), Tracker)


def test_pipelines_tracking_does_not_leak_mlflow_into_instalign():
    code = "import instalign, instalign.tracking, sys; assert 'mlflow' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})



#: Credentials as a careless user would type them into a storage path and a command line.
S3_WITH_KEYS = "s3://AKIAKEY123:SeCrEt456@bucket/x"
TOKEN_URL = "https://store.example/data?token=abc987xyz&v=1"
SECRETS = ("AKIAKEY123", "SeCrEt456", "abc987xyz", "hunter2")


def test_credentials_never_reach_the_run(store, tmp_path, tiny_cfg):
    """Run name, params, tags and the logged manifest/config: every string is redacted before
    MLflow stores it (params are immutable, so nothing may be cleaned up afterwards)."""
    import json

    from mlflow import MlflowClient

    from pipelines.training.run_inputs import log_run_inputs

    # Recorded verbatim by a careless caller (not through redaction.command_line).
    command = f"instalign train --data {S3_WITH_KEYS} --storage-path {TOKEN_URL} --aws-secret-access-key=hunter2"
    run_id, _ = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="job?token=abc987xyz",
                                    tags={"instalign.source": TOKEN_URL})
    tracker = MlflowTracker(run_id=run_id, tracking_uri=store, owns_run=True)
    manifest = {"dataset": "grefcoco", "command": command, "sources": {"root": S3_WITH_KEYS}}
    log_run_inputs(tracker, tiny_cfg, manifest, f"{S3_WITH_KEYS}/prepared",
                   {"storage_path": f"{S3_WITH_KEYS}/ray_results?X-Amz-Signature=abc987xyz", "command": command})
    tracker.set_tags({"instalign.ray_run_path": f"{TOKEN_URL}/run"})
    tracker.log_params({"run.storage_path": f"{S3_WITH_KEYS}/other"})  # a changed value becomes a tag
    tracker.close()

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    recorded = {"run_name": run.info.run_name, **run.data.params, **run.data.tags}
    recorded.update({f"input.{d.dataset.name}": f"{d.dataset.source} {d.dataset.profile}"
                     for d in run.inputs.dataset_inputs})
    assert "input.grefcoco" in recorded
    leaks = {k: v for k, v in recorded.items() if any(s in v for s in SECRETS)}
    assert not leaks, f"credentials stored in MLflow: {leaks}"
    # Redacted, not dropped: what the values were is still readable.
    assert run.data.params["run.storage_path"] == "s3://***@bucket/x/ray_results?X-Amz-Signature=***"
    assert run.data.params["run.command"] == ("instalign train --data s3://***@bucket/x --storage-path "
                                              "https://store.example/data?token=***&v=1 --aws-secret-access-key=***")
    assert run.data.tags["instalign.data_dir"] == "s3://***@bucket/x/prepared"
    assert run.data.tags["instalign.source"] == "https://store.example/data?token=***&v=1"
    assert "instalign.param_changed.run.storage_path" in run.data.tags

    local = client.download_artifacts(run_id, "dataset/_manifest.json", str(tmp_path))
    with open(local) as f:
        logged = json.load(f)
    assert not any(s in json.dumps(logged) for s in SECRETS), logged
    assert logged["command"] == run.data.params["run.command"]

    # The same (redacted) name finds the same run again: resuming still works.
    again, resumed = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="job?token=abc987xyz")
    assert (again, resumed) == (run_id, True)


def test_every_run_records_source_user_and_the_redacted_command(store, monkeypatch):
    """``create_run`` adds no context tags of its own: ``start_or_resume_run`` adds MLflow's
    (source, user) and the command line, redacted; a child run carries its parent's."""
    from mlflow import MlflowClient

    from pipelines.core.tracking import COMMAND_TAG, RESUME_COMMAND_TAG

    monkeypatch.setattr(sys, "argv", ["/venv/bin/instalign", "train", "--data", S3_WITH_KEYS, "--token", "hunter2"])
    run_id, _ = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="ctx")
    client = MlflowClient(tracking_uri=store)
    tags = client.get_run(run_id).data.tags
    assert tags[COMMAND_TAG] == "/venv/bin/instalign train --data 's3://***@bucket/x' --token ***"
    assert tags["mlflow.source.name"] == "/venv/bin/instalign" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]
    assert not any(s in v for v in tags.values() for s in SECRETS)

    # A trial's process is a Ray worker: its run carries the parent's command, not the worker's argv.
    monkeypatch.setattr(sys, "argv", ["/ray/default_worker.py", "--node-ip-address=1.2.3.4"])
    child, _ = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="ctx-trial-1",
                                   tags={"mlflow.parentRunId": run_id})
    child_tags = client.get_run(child).data.tags
    assert child_tags[COMMAND_TAG] == tags[COMMAND_TAG]
    assert child_tags["mlflow.source.name"] == "/venv/bin/instalign"

    # Resuming keeps the first command and records the resuming one.
    monkeypatch.setattr(sys, "argv", ["instalign", "train", "--name", "ctx"])
    again, resumed = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="ctx")
    tags = client.get_run(again).data.tags
    assert resumed and tags[COMMAND_TAG].startswith("/venv/bin/instalign train --data")
    assert tags[RESUME_COMMAND_TAG] == "instalign train --name ctx"

