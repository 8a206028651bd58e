"""A prepared dataset as an MLflow run input (``pipelines.data.lineage``): its name, digest and
redacted source, logged into runs against a real sqlite MLflow store."""

from __future__ import annotations

import json

import pytest

from pipelines.core.tracking import start_or_resume_run
from pipelines.data.lineage import dataset_entity, manifest_digest


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_manifest_digest_names_the_content_not_the_key_order():
    a = {"dataset": "grefcoco", "counts": {"train": {"samples": 12, "images": 3}}}
    b = {"counts": {"train": {"images": 3, "samples": 12}}, "dataset": "grefcoco"}
    assert manifest_digest(a) == manifest_digest(b) and len(manifest_digest(a)) == 64
    assert manifest_digest(a) != manifest_digest({**a, "dataset": "refcoco"})


def test_the_entity_names_the_dataset_by_its_manifest_with_the_source_redacted():
    manifest = {"dataset": "grefcoco", "counts": {"val": {"samples": 5}}, "command": "not in the profile",
                "quarantined": {"bad_mask": 1}}
    entity = dataset_entity(manifest, "s3://AKIAKEY123:SeCrEt456@bucket/prepared")
    assert (entity.name, entity.digest) == ("grefcoco", manifest_digest(manifest)[:32])
    assert (entity.source_type, json.loads(entity.source)) == ("s3", {"uri": "s3://***@bucket/prepared"})
    assert json.loads(entity.profile) == {"counts": {"val": {"samples": 5}}, "quarantined": {"bad_mask": 1}}
    local = dataset_entity({}, "/data/prepared")
    assert (local.name, local.source_type) == ("instalign-dataset", "local")


def test_a_synthetic_release_is_named_synthetic_and_a_real_one_by_its_dataset(store):
    """The quickstart's synthetic gRefCOCO must not read as gRefCOCO in a run's inputs: its
    manifest's ``source_info`` (the generator's ``info`` block) names it ``synthetic-grefcoco``."""
    from mlflow import MlflowClient

    from instalign.data.synthetic import SYNTHETIC_DESCRIPTION_PREFIX
    from pipelines.data.lineage import log_dataset_input

    synthetic = {"dataset": "grefcoco", "counts": {"val": {"samples": 5}},
                 "source_info": {"description": "InstAlign synthetic gRefCOCO", "seed": 0, "num_images": 24}}
    objects = {"dataset": "grefcoco",
               "source_info": {"description": f"{SYNTHETIC_DESCRIPTION_PREFIX} GRES, held-out 'objects' style"}}
    real = {"dataset": "grefcoco", "source_info": {"description": "gRefCOCO", "year": 2023}}
    assert dataset_entity(synthetic, "/data/s").name == dataset_entity(objects, "/data/o").name == "synthetic-grefcoco"
    assert [dataset_entity(m, "/data/r").name for m in (real, {"dataset": "refcoco"}, {"dataset": "refcoco",
            "source_info": "not a mapping"})] == ["grefcoco", "refcoco", "refcoco"]
    assert json.loads(dataset_entity(synthetic, "/data/s").profile)["source_info"] == synthetic["source_info"]

    run_id = start_or_resume_run(tracking_uri=store, experiment="names", run_name="synthetic")[0]
    log_dataset_input(store, run_id, synthetic, "/data/s")
    [logged] = MlflowClient(tracking_uri=store).get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "synthetic-grefcoco"


def test_concurrent_runs_of_one_experiment_log_the_same_dataset(store):
    """Tune's trials start together and each logs the same prepared dataset into one
    experiment: the store's look-up-then-insert races, and the loser's insert breaks the
    (experiment, name, digest) unique constraint. Every run must still get its input."""
    import threading

    from mlflow import MlflowClient

    from pipelines.data.lineage import log_dataset_input

    manifest = {"dataset": "grefcoco", "counts": {"train": {"samples": 12}}, "created": "2026-11-30"}
    for round_ in range(3):  # fresh dataset rows each round: a new digest
        manifest["created"] = f"2026-11-30 round {round_}"
        runs = [start_or_resume_run(tracking_uri=store, experiment="race", run_name=f"r{round_}-{i}")[0]
                for i in range(6)]
        barrier, errors = threading.Barrier(len(runs)), []

        def log(run_id: str) -> None:
            barrier.wait()
            try:
                log_dataset_input(store, run_id, manifest, "/data/prepared")
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        client = MlflowClient(tracking_uri=store)
        assert all([d.dataset.name for d in client.get_run(r).inputs.dataset_inputs] == ["grefcoco"] for r in runs)

