"""``instalign register``: aliases move between versions; models:/ URIs resolve to checkpoints.

A real sqlite MLflow store under tmp; the checkpoints are random tiny models.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mlflow_store import tracking_store
from tests.support.tiny_checkpoint import make_checkpoint

NAME = "instalign-test-registry"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with tracking_store(tmp_path_factory.mktemp("mlflow-registry"), "registry-tests") as uri:
        yield uri


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("registry") / "ckpt")


@pytest.fixture(scope="module")
def versions(store, checkpoint):
    """Version 1 registered from a checkpoint by the CLI; version 2 by a "training" run."""
    import mlflow

    from pipelines.cli import main
    from pipelines.models.registry import log_and_register

    assert main(["register", "--checkpoint", str(checkpoint), "--name", NAME, "--alias", "candidate",
                 "--tracking-uri", store]) == 0
    with mlflow.start_run(run_name="train-like") as run:
        v2 = log_and_register(checkpoint, registered_model_name=NAME, alias="candidate", run_id=run.info.run_id)
    return run.info.run_id, v2


def alias_version(alias: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(NAME, alias).version)


def test_register_checkpoint_then_promote_the_runs_version(store, versions, capsys):
    from pipelines.cli import main

    run_id, v2 = versions
    assert str(v2.version) == "2" and v2.run_id == run_id
    assert alias_version("candidate") == "2"  # the alias moved from version 1 to 2

    assert main(["register", "--run", run_id, "--alias", "champion", "--tracking-uri", store]) == 0
    assert f"models:/{NAME}@champion -> version 2" in capsys.readouterr().out
    assert alias_version("champion") == "2"

    # Roll back: point champion at version 1 by hand; the registry holds exactly one champion.
    from pipelines.models.registry import set_alias

    set_alias(NAME, 1, "champion")
    assert alias_version("champion") == "1"
    from mlflow import MlflowClient

    assert "champion" not in MlflowClient().get_model_version(NAME, "2").aliases


def test_models_uri_resolves_to_the_same_checkpoint(store, versions, checkpoint, tmp_path):
    from pipelines.models.source import resolve_checkpoint

    local = resolve_checkpoint(f"models:/{NAME}/2")
    for rel in ("config.yaml", "model.safetensors", "text_encoder/tokenizer.json"):
        assert (local / rel).read_bytes() == (checkpoint / rel).read_bytes(), rel
    # The model holds an inference export (its own seal): the same files, digests and all.
    from instalign.checkpoint import export_inference_checkpoint
    from instalign.integrity import verify

    assert verify(local)["files"] == verify(export_inference_checkpoint(checkpoint, tmp_path / "export"))["files"]
    # Only the checkpoint came down, not the bundled code, into the cache entry of version 2.
    assert local.parts[-2:] == (NAME, "2") and local.parent.parent.parent.name == "models"
    assert not (local / "code").exists() and not (local / ".download").exists()
    from mlflow import MlflowClient

    champion = MlflowClient().get_model_version_by_alias(NAME, "champion").version
    assert resolve_checkpoint(f"models:/{NAME}@champion").parts[-2:] == (NAME, str(champion))


def test_concurrent_resolves_share_one_download(store, versions, tmp_path):
    """Two processes asking for the same version at once: one downloads, the other waits and reuses it."""
    import os
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "from pipelines.models.source import resolve_checkpoint; print(resolve_checkpoint(sys.argv[1]))")
    env = {**os.environ, "INSTALIGN_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": store}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"models:/{NAME}/1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    downloads = sum(err.count("downloading models:/") for _, err in outs)
    assert downloads == 1, [err for _, err in outs]
    entry = Path(paths.pop())
    assert sorted(p.name for p in entry.parent.iterdir()) == [".1.lock", "1"]  # no temporaries left
    from instalign.checkpoint import load_model

    load_model(entry)


def test_unknown_run_alias_and_name_are_clear_errors(store, versions, capsys):
    from pipelines.cli import main
    from pipelines.models.source import RegistryError, resolve_checkpoint

    assert main(["register", "--run", "0" * 32, "--alias", "champion", "--tracking-uri", store]) == 1
    assert "no registered model version was created by this run" in capsys.readouterr().err
    with pytest.raises(RegistryError, match="alias nope"):
        resolve_checkpoint(f"models:/{NAME}@nope")
    with pytest.raises(RegistryError, match="no-such-model"):
        resolve_checkpoint("models:/no-such-model/1")
    run_id, _ = versions
    assert main(["register", "--run", run_id, "--name", "other-name", "--tracking-uri", store]) == 1
    assert "under the name 'other-name'" in capsys.readouterr().err
    assert main(["register", "--checkpoint", "/nonexistent/ckpt", "--name", NAME, "--tracking-uri", store]) == 1
    assert "/nonexistent/ckpt" in capsys.readouterr().err


def test_a_run_with_two_models_needs_a_name(store, checkpoint):
    import mlflow

    from pipelines.models.registry import promote_run
    from pipelines.models.source import RegistryError
    from pipelines.models.pyfunc import log_model

    with mlflow.start_run() as run:
        log_model(checkpoint, name="a", registered_model_name=f"{NAME}-a")
        log_model(checkpoint, name="b", registered_model_name=f"{NAME}-b")
    with pytest.raises(RegistryError, match="several models"):
        promote_run(run.info.run_id, alias="champion")
    version = promote_run(run.info.run_id, alias="champion", name=f"{NAME}-b")
    assert version.name == f"{NAME}-b" and "champion" in version.aliases


def test_annotate_version_writes_metrics_beside_baselines_and_the_decision(store, versions):
    """What the quickstart's gate records: metrics against the baselines, the decision, tags."""
    from pipelines.models.registry import annotate_version
    from pipelines.models.source import RegistryError

    run_id, v2 = versions
    base = {"always empty": {"gIoU": 20.0, "N_acc": 0.0}, "always no-target": {"gIoU": 30.0, "N_acc": 100.0}}
    version = annotate_version(NAME, v2.version, metrics={"gIoU": 35.5, "N_acc": 60.0, "ignored_key": 1.0},
                               baselines=base, decision="PASS gIoU 35.5 > 30.0 -> promoted to @champion",
                               metrics_source="val split, instalign evaluate")
    lines = version.description.splitlines()
    assert "| metric | this version | always empty | always no-target |" in lines
    assert "| gIoU | 35.50 | 20 | 30 |" in lines and "| N_acc | 60 | 0 | 100 |" in lines
    assert "**Metrics** (val split, instalign evaluate; percentages):" in lines
    assert "**Promotion:** PASS gIoU 35.5 > 30.0 -> promoted to @champion" in lines
    assert f"**Run:** `{run_id}`" in version.description and "ignored_key" not in version.description
    assert version.tags["metric.gIoU"] == "35.50" and version.tags["instalign.run_id"] == run_id
    assert version.tags["instalign.promotion"].startswith("PASS")
    with pytest.raises(RegistryError, match="version 99"):
        annotate_version(NAME, 99)


def test_model_ref_names_the_version_and_its_logged_model(store, versions):
    from mlflow import MlflowClient

    from pipelines.models.source import RegistryError, model_ref

    run_id, v2 = versions
    ref = model_ref(f"models:/{NAME}@candidate")
    assert (ref.name, ref.version, ref.run_id) == (NAME, "2", run_id)
    assert ref.model_id and MlflowClient().get_logged_model(ref.model_id).source_run_id == run_id
    assert model_ref(f"models:/{ref.model_id}").model_id == ref.model_id
    with pytest.raises(RegistryError, match="alias nope"):
        model_ref(f"models:/{NAME}@nope")


def test_register_cli_keeps_artifacts_beside_its_store(tmp_path):
    """``instalign register --checkpoint`` in a fresh process and a fresh store: its run goes to
    the ``--experiment`` (artifacts beside the sqlite file), not to MLflow's Default experiment,
    whose artifacts land in ``./mlruns`` of whatever directory the command ran in."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    cwd, store_dir = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store_dir.mkdir()
    store = f"sqlite:///{store_dir / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "register", "--checkpoint", str(checkpoint),
                           "--name", "cwd-test", "--alias", "candidate", "--tracking-uri", store,
                           "--experiment", "registrations"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (cwd / "mlruns").exists() and os.listdir(cwd) == []
    client = MlflowClient(store)
    version = client.get_model_version_by_alias("cwd-test", "candidate")
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "registrations"
    assert run.info.artifact_uri.startswith((store_dir / "mlruns").resolve().as_uri()), run.info.artifact_uri
