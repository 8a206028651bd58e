"""The two MLflow copies of a training checkpoint, as ``instalign train`` logs them.

A training run logs its best checkpoint twice: as the run's artifact ``checkpoints/best``
(``pipelines.core.tracking.log_checkpoint``) and as the registered pyfunc model's artifact
``checkpoint`` (``pipelines.models.pyfunc.log_and_register``). Both are inference copies: weights,
config and tokenizer under a seal of their own, no optimizer state. Each copy is downloaded
from a real sqlite store and loaded through the public loaders; the run's params stay the
run's settings (no serving limits logged as ``None``).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.support.mlflow_store import tracking_store
from tests.support.training_checkpoint import make_training_checkpoint

MODEL_NAME = "instalign-test-copies"
TRAINING_STATE = {"training_state.json", "training_state.safetensors"}
PARAMS = {"train.lr": "0.001", "model.image_size": "64", "data.dir": "/data/prepared"}


def _size(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _names(directory) -> set[str]:
    return {p.name for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A train-like run: known params, the best checkpoint logged, then registered in that run."""
    from pipelines.models.registry import log_and_register
    from pipelines.core.tracking import MlflowTracker, log_checkpoint, start_or_resume_run

    root = tmp_path_factory.mktemp("copies")
    checkpoint = make_training_checkpoint(root / "step_00000001")
    with tracking_store(root, "copies") as uri:
        run_id, _ = start_or_resume_run(tracking_uri=uri, experiment="copies", run_name="copies-run")
        tracker = MlflowTracker(run_id=run_id, tracking_uri=uri, owns_run=True)
        tracker.log_params(PARAMS)
        log_checkpoint(tracker, checkpoint, "checkpoints/best")
        version = log_and_register(checkpoint, registered_model_name=MODEL_NAME, alias="candidate", run_id=run_id)
        tracker.end("FINISHED")
        yield {"root": root, "checkpoint": checkpoint, "run_id": run_id, "version": version}


def test_the_runs_best_checkpoint_loads_and_holds_no_training_state(logged, tmp_path):
    import mlflow

    from instalign.checkpoint import CheckpointError, load_model, load_training_state
    from instalign.predictor import Predictor

    best = mlflow.artifacts.download_artifacts(run_id=logged["run_id"], artifact_path="checkpoints/best",
                                               dst_path=str(tmp_path))
    best = Path(best)
    assert not _names(best) & TRAINING_STATE
    load_model(best)
    predictor = Predictor.from_checkpoint(best, device="cpu")
    assert predictor.predict(Image.new("RGB", (40, 30), (10, 200, 30)), "the green box").mask.shape == (30, 40)
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(best)
    source = _size(logged["checkpoint"])
    print(f"checkpoints/best: {_size(best)} bytes, training checkpoint {source} bytes")
    assert _size(best) < 0.5 * source  # AdamW's two moments are twice the weights


def test_the_registered_model_holds_an_inference_checkpoint(logged, tmp_path):
    import mlflow

    from instalign.checkpoint import load_model
    from pipelines.models.source import resolve_checkpoint

    uri = f"models:/{MODEL_NAME}@candidate"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "model"))
    local = Path(local)
    assert not _names(local) & TRAINING_STATE
    source = _size(logged["checkpoint"])
    print(f"logged model: {_size(local)} bytes, training checkpoint {source} bytes")
    assert _size(local) < 0.5 * source

    cached = resolve_checkpoint(uri)  # the project's registry loader (evaluate, predict)
    assert not _names(cached) & TRAINING_STATE
    load_model(cached)

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [buf.getvalue()], "text": ["the box"]}))
    assert len(out) == 1


def test_the_runs_params_are_its_settings_and_serving_limits_still_load(logged):
    from dataclasses import fields

    import mlflow
    from mlflow import MlflowClient

    from pipelines.models.limits import ServingLimits

    params = MlflowClient().get_run(logged["run_id"]).data.params
    assert params == PARAMS
    assert not {f.name for f in fields(ServingLimits)} & set(params)
    # The logged model still declares every limit as a load-time ``model_config`` key.
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate", model_config={"max_rows": 1})
    assert model.unwrap_python_model().limits.max_rows == 1
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with pytest.raises(Exception, match="2 rows, above the limit of 1 rows"):
        model.predict(pd.DataFrame({"image": [buf.getvalue()] * 2, "text": ["a", "b"]}))
