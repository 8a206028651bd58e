"""Where a model comes from (``pipelines.models.source``): a directory, or a ``models:/`` URI.

Registered versions resolved through a real registry are in ``test_registry.py`` (they share
its versions); here: directories, the object-store payload, and what a bad URI says.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from instalign.checkpoint import checkpoint_files
from pipelines.models.source import (
    RegistryError,
    checkpoint_payload,
    is_model_uri,
    materialise,
    resolve_checkpoint,
    version_model_id,
)
from tests.support.mlflow_store import tracking_store
from tests.support.tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("source") / "ckpt")


def test_a_directory_is_its_own_source_and_anything_else_is_a_clear_error(checkpoint, tmp_path):
    assert is_model_uri("models:/m@champion") and not is_model_uri(checkpoint)
    assert resolve_checkpoint(checkpoint) == checkpoint
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nowhere': not a directory \(nor a models:/ URI\)"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_a_payload_carries_a_checkpoint_that_still_verifies(checkpoint):
    (checkpoint / ".hidden").write_text("not carried")
    payload = checkpoint_payload(checkpoint)
    assert ".hidden" not in payload and all(isinstance(v, bytes) for v in payload.values())
    copy = materialise(payload)
    try:
        assert set(checkpoint_files(copy.name)) == set(checkpoint_files(checkpoint))
    finally:
        copy.cleanup()


def test_the_logged_model_id_comes_from_the_version_or_its_source():
    assert version_model_id(SimpleNamespace(model_id="m-abc", source="models:/m-other")) == "m-abc"
    assert version_model_id(SimpleNamespace(model_id=None, source="models:/m-123/artifacts")) == "m-123"
    assert version_model_id(SimpleNamespace(model_id=None, source="runs:/r/model")) is None


def test_an_unknown_registered_model_is_a_registry_error(tmp_path):
    with tracking_store(tmp_path, "source-tests"):
        with pytest.raises(RegistryError, match="models:/no-such-model@champion: "):
            resolve_checkpoint("models:/no-such-model@champion")
