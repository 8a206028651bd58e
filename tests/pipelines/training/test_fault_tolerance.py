"""A Train worker dies mid-run (``os._exit``): Ray restarts the group from the last checkpoint.

The test installs the crash as a worker observer (``worker_hooks.CrashOnce``: a marker file
makes it fire once); production code has no fault switch. The killed rank's sample log
(``worker_hooks.SampleLog``) shows exactly where training picked up again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instalign.config import load_config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
def test_worker_crash_resumes_from_checkpoint_into_the_same_mlflow_run(prepared_dataset, ray_local, tmp_path):
    from mlflow import MlflowClient

    from pipelines.training.train import train
    from tests.support.worker_hooks import CrashOnce, SampleLog, observing

    marker = tmp_path / "fired"
    cfg = load_config("tiny", ["data.max_train_samples=32", "data.max_val_samples=4", "data.num_overlays=0",
                               "train.epochs=2", "train.batch_size=8", "train.max_steps=7", "train.log_every_steps=1",
                               "train.checkpoint_every_steps=2", "loss.num_points=256"])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # after step 5; checkpoints at steps 2 and 4
    with observing(CrashOnce(5, marker, then=SampleLog(tmp_path / "samples"))):
        result = train(cfg, str(prepared_dataset), num_workers=2, cpus_per_worker=0.5, name="crash",
                       storage_path=str(tmp_path / "ray"), experiment="test-ft", tracking_uri=store, max_failures=1)

    assert marker.read_text().startswith("killed rank 1 before step 6")
    # It ends at the planned step, with the planned epoch bookkeeping (4 steps per epoch).
    assert (result.metrics["step"], result.metrics["epoch"], result.metrics["epoch_step"]) == (7, 1, 3)
    assert (Path(result.path) / "step_00000007").is_dir()

    # The killed rank: two attempts; the second starts right after a checkpoint (step 4, or
    # step 2 when Ray had not registered step 4 yet), never from scratch.
    log = read_jsonl(tmp_path / "samples" / "rank1.jsonl")
    assert [r["event"] for r in log if "event" in r] == ["start", "start", "resume"]
    restart = [i for i, r in enumerate(log) if r.get("event") == "start"][1]
    before = [r["step"] for r in log[:restart] if "step" in r]
    after = [r["step"] for r in log[restart:] if "step" in r]
    assert before == [1, 2, 3, 4, 5]
    assert after[0] in (3, 5) and after == list(range(after[0], 8))
    resume = next(r for r in log if r.get("event") == "resume")
    assert resume == {"event": "resume", "rank": 1, "from": f"step_{after[0] - 1:08d}", "skipped": []}

    # One MLflow run for the job; its metrics run on to step 7.
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("test-ft").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert set(steps) == set(range(1, 8)) and max(steps) == 7
    assert len(steps) > 7  # the steps after the resume point were trained (and logged) twice
    assert {m.step for m in client.get_metric_history(result.mlflow_run_id, "val_gIoU")} == {4, 7}
