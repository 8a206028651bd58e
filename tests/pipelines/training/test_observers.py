"""What watches the step loop (``pipelines.training.observers``), driven without Ray.

The loop itself runs on Ray in ``test_train.py`` (MLflow contents, checkpoints, resume),
``test_fault_tolerance.py`` and ``test_run_output.py`` (the printed lines of a real run); here
the observers get the loop's events by hand: the progress lines a resumed run prints, the
tags and metrics its MLflow run gets, and the fan-out's order and closing.
"""

from __future__ import annotations

import json

import pytest

from instalign.config import load_config
from pipelines.training.observers import Observer, Observers, Place, ProgressLines, Tracking

PLACE = Place(rank=0, world=2, node_ids=["n0", "n1"], device="cpu", precision="fp32")
WINDOW = {"loss": 1.5, "lr": 1e-4, "epoch": 1}


def test_progress_lines_of_a_resumed_run(capsys):
    cfg = load_config("tiny", ["train.epochs=2", "train.batch_size=8", "train.print_every_steps=2"])
    progress = ProgressLines(cfg, steps_per_epoch=4, max_steps=8)
    progress.started(PLACE)
    progress.resumed("step_00000004", [])
    progress.loop_starts(4)
    progress.trained(WINDOW, 5, 1)  # 5 // 2 == 4 // 2: no line
    progress.trained(WINDOW, 6, 1)
    progress.trained(WINDOW, 7, 1)
    progress.epoch_ends(7, 1)  # the epoch's last window, forced once
    progress.epoch_ends(7, 1)
    progress.validated({"val_gIoU": 41.0, "val_samples": 8}, 7, 1, model=None)
    progress.finished(7)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[train] start (resumed from step_00000004 at step 4): 2 epochs x 4 steps = 8 steps, "
                        "global batch 8 on 2 workers (cpu, fp32)")
    assert [line.split(" | ")[0] for line in lines[1:3]] == ["[train] epoch 2/2 step 6/8 (75%)",
                                                             "[train] epoch 2/2 step 7/8 (88%)"]
    assert lines[3] == "[train] epoch 2/2 val at step 7: gIoU 41.0 (8 samples)"
    assert lines[4].startswith("[train] done: step 7/8 in ") and len(lines) == 5


def test_tracking_tags_the_placement_and_the_resume_and_logs_the_metrics(tmp_path):
    from mlflow import MlflowClient

    from pipelines.core.tracking import MlflowTracker, start_or_resume_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = start_or_resume_run(tracking_uri=store, experiment="observers", run_name="r")
    tracking = Tracking(MlflowTracker(run_id=run_id, tracking_uri=store))
    tracking.started(PLACE)
    tracking.resumed("step_00000004", [("step_00000006", "truncated")])
    tracking.trained(WINDOW, 6, 1)
    tracking.validated({"val_gIoU": 41.0}, 7, 1, model=None)
    tracking.close()
    run = MlflowClient(tracking_uri=store).get_run(run_id)
    tags = run.data.tags
    assert json.loads(tags["instalign.worker_nodes"]) == ["n0", "n1"] and tags["instalign.num_workers"] == "2"
    assert tags["instalign.resumed_from"] == "step_00000004"
    assert json.loads(tags["instalign.skipped_checkpoints"]) == {"step_00000006": "truncated"}
    assert run.data.metrics == {"loss": 1.5, "lr": 1e-4, "epoch": 1.0, "val_gIoU": 41.0}


class Recorder(Observer):
    def __init__(self, name: str, seen: list, fail_close: bool = False) -> None:
        self.name, self.seen, self.fail_close = name, seen, fail_close

    def trained(self, metrics, step, epoch):
        self.seen.append((self.name, "trained", step))

    def close(self):
        self.seen.append((self.name, "close"))
        if self.fail_close:
            raise RuntimeError(f"{self.name} failed to close")


class Batches(Observer):
    def batch(self, epoch, step, sample_ids):
        pass


def test_observers_fan_out_in_order_and_all_close_even_when_one_fails():
    seen: list = []
    both = Observers([Recorder("a", seen, fail_close=True), Recorder("b", seen)])
    both.trained(WINDOW, 3, 0)
    with pytest.raises(RuntimeError, match="a failed to close"):
        both.close()
    assert seen == [("a", "trained", 3), ("b", "trained", 3), ("a", "close"), ("b", "close")]
    # The loop tells batches only when someone watches them (a per-batch call otherwise saved).
    assert not both.wants_batches and Observers([Recorder("a", []), Batches()]).wants_batches
