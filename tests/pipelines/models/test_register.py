"""``instalign register`` (``pipelines.models.register``): a checkpoint or a run's model gets an alias.

A real sqlite MLflow store; more registry behaviour (aliases of a run's version, unknown
runs and names) is in ``test_registry.py``.
"""

from __future__ import annotations

import pytest

from pipelines.cli import main
from tests.support.mlflow_store import tracking_store
from tests.support.tiny_checkpoint import make_checkpoint


@pytest.fixture
def store(tmp_path):
    with tracking_store(tmp_path / "mlflow", "register-tests") as uri:
        yield uri


def test_a_checkpoint_becomes_a_version_with_the_alias(store, tmp_path, capsys):
    from mlflow import MlflowClient

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    assert main(["register", "--checkpoint", str(checkpoint), "--name", "reg", "--alias", "candidate",
                 "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    version = MlflowClient(tracking_uri=store).get_model_version_by_alias("reg", "candidate")
    assert out.startswith(f"models:/reg@candidate -> version {version.version} (run {version.run_id}; {store})")
    assert main(["register", "--run", version.run_id, "--alias", "champion", "--tracking-uri", store]) == 0
    assert MlflowClient(tracking_uri=store).get_model_version_by_alias("reg", "champion").version == version.version


def test_a_checkpoint_needs_a_name_and_a_missing_one_is_one_line(store, tmp_path, capsys):
    assert main(["register", "--checkpoint", str(tmp_path), "--tracking-uri", store]) == 2
    assert capsys.readouterr().err == "instalign register: --checkpoint needs --name\n"
    assert main(["register", "--checkpoint", str(tmp_path / "none"), "--name", "reg", "--tracking-uri", store]) == 1
    err = capsys.readouterr().err
    assert err.startswith("instalign register: ") and "none" in err and err.count("\n") == 1
