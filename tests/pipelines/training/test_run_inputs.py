"""What a training run starts from (``pipelines.training.run_inputs``): git commit, the prepared
dataset as the run's input, against a real sqlite MLflow store. That no credential reaches a
run through these is in ``tests/pipelines/core/test_tracking.py``."""

from __future__ import annotations

import pytest

from pipelines.core.tracking import MlflowTracker, start_or_resume_run
from pipelines.training.run_inputs import git_commit, system_info

#: A storage URI with credentials in it (redacted in what the run records).
S3_WITH_KEYS = "s3://AKIAKEY123:SeCrEt456@bucket/x"


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_driver_metadata_helpers(tmp_path):
    commit = git_commit()
    assert commit is None or len(commit.split("-")[0]) == 40
    assert git_commit(tmp_path) is None  # not a checkout


def test_system_info_names_the_versions_that_made_a_run():
    import torch

    info = system_info()
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert {"python", "platform", "ray", "mlflow", "timm", "transformers"} <= set(info)


def test_the_prepared_dataset_is_the_runs_input(store, tiny_cfg):
    """Lineage: the run's ``inputs.dataset_inputs`` holds the dataset (name, the manifest's
    digest, the redacted source, the counts as profile), once however often it is logged."""
    import json

    from mlflow import MlflowClient

    from pipelines.data.lineage import DATASET_CONTEXT_TAG
    from pipelines.training.run_inputs import log_run_inputs
    from pipelines.core.tracking import MANIFEST_HASH_TAG

    manifest = {"format": "instalign-gres-parquet", "dataset": "grefcoco", "schema_version": 1,
                "counts": {"train": {"samples": 12, "images": 3}, "val": {"samples": 5, "images": 1}},
                "quarantined": {"bad_mask": 1}, "created": "2026-11-30T00:00:00+00:00"}
    run_id, _ = start_or_resume_run(tracking_uri=store, experiment="exp", run_name="with-data")
    tracker = MlflowTracker(run_id=run_id, tracking_uri=store)
    log_run_inputs(tracker, tiny_cfg, manifest, f"{S3_WITH_KEYS}/prepared", {"num_workers": 1})
    log_run_inputs(tracker, tiny_cfg, manifest, f"{S3_WITH_KEYS}/prepared", {"num_workers": 1})  # a resume

    run = MlflowClient(tracking_uri=store).get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    ds = inp.dataset
    assert ds.name == "grefcoco"
    assert ds.digest == run.data.tags[MANIFEST_HASH_TAG][:32]
    assert (ds.source_type, json.loads(ds.source)) == ("s3", {"uri": "s3://***@bucket/x/prepared"})
    profile = json.loads(ds.profile)
    assert profile["counts"] == manifest["counts"] and profile["quarantined"] == {"bad_mask": 1}
    assert {t.key: t.value for t in inp.tags} == {DATASET_CONTEXT_TAG: "train"}

