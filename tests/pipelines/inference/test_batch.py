"""``instalign predict --data``: offline inference on Ray Data (pipelines.inference.batch).

A tiny random checkpoint biased to report instances is registered as
``models:/instalign-batch-test@champion`` in a temporary sqlite MLflow store; then, on a real
local Ray cluster:

* a table of image paths and expressions with every kind of bad row (a corrupt file, a
  missing one, an empty and an over-long expression) finishes: the good rows are predicted
  exactly as the checkpoint's own ``Predictor`` answers them (pyfunc record format), the bad
  ones land in ``rejects/`` with their reason, and the summary counts both;
* a prepared dataset split (with ground truth) gets per-sample IoU, and the aggregate
  GRES metrics in an MLflow run tagged with the registered model's name and version — the
  same numbers the driver recomputes from the written IoUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.inference.tables import BatchPredictError

from tests.support.mlflow_store import tracking_store
from tests.support.tiny_checkpoint import make_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "instalign-batch-test"


@pytest.fixture(scope="module", autouse=True)
def _mlflow_state_restored():
    """``mlflow.set_experiment`` (here and in ``batch_predict``) and ``configure_tracking`` set
    process-wide state: the tracking URI, the active experiment id and ``$MLFLOW_EXPERIMENT_ID``.
    Left behind, a later test file's ``mlflow.start_run`` on its own store looks for this
    store's experiment id and fails ("No Experiment with id=2 exists")."""
    import mlflow
    from mlflow.tracking import fluent

    uri, active, env = mlflow.get_tracking_uri(), fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")
    yield
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = active
    if env is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = env


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from pipelines.models.registry import log_and_register

    root = tmp_path_factory.mktemp("batch")
    checkpoint = make_checkpoint(root / "checkpoint", score_bias=4.0, no_target_bias=-4.0)
    with tracking_store(root, "batch-test") as uri:
        version = log_and_register(checkpoint, registered_model_name=MODEL, alias="champion")
    return {"root": root, "checkpoint": checkpoint, "tracking_uri": uri, "version": str(version.version)}


def _png(path, size, colour) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (30, 30, 30))
    ImageDraw.Draw(img).ellipse([5, 5, size[0] // 2, size[1] // 2], fill=colour)
    img.save(path)
    return path.name


def _args(registered, data, out, **extra) -> argparse.Namespace:
    from pipelines.inference.batch import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", f"models:/{MODEL}@champion", "--data", str(data), "--out", str(out),
            "--tracking-uri", registered["tracking_uri"], "--batch-size", "4"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_table_with_bad_rows_finishes_and_counts_them(registered, ray_local, one_thread, tmp_path, capsys):
    from instalign.predictor import Predictor
    from pipelines.inference.batch import run
    from pipelines.inference.tables import PREDICTION_SCHEMA, REJECT_SCHEMA
    from pipelines.models.records import prediction_to_record

    images = tmp_path / "images"
    images.mkdir()
    good = [_png(images / "a.png", (64, 48), (200, 40, 40)), _png(images / "b.png", (50, 70), (40, 200, 40))]
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    rows = [("g0", f"images/{good[0]}", "the red ball"),
            ("g1", str(images / good[1]), "the green ball on the left"),
            ("bad-corrupt", "images/broken.png", "the ball"),
            ("bad-missing", "images/nowhere.png", "the ball"),
            ("bad-empty", f"images/{good[0]}", "   "),
            ("bad-long", f"images/{good[0]}", " ".join(["ball"] * 80)),
            ("g2", f"images/{good[1]}", "the thing at the top")]
    table = tmp_path / "pairs.csv"
    table.write_text("id,image_path,text\n" + "".join(f'{i},{p},"{t}"\n' for i, p, t in rows))
    out = tmp_path / "out"

    assert run(_args(registered, table, out)) == 0
    printed = capsys.readouterr().out
    assert "7 rows: 3 predicted, 4 rejected" in printed

    preds = pq.read_table(out / "predictions")
    rejects = pq.read_table(out / "rejects")
    assert preds.schema.names == PREDICTION_SCHEMA.names and rejects.schema.names == REJECT_SCHEMA.names
    reasons = dict(zip(rejects["row_id"].to_pylist(), rejects["reason"].to_pylist()))
    assert reasons == {"bad-corrupt": "unreadable_image", "bad-missing": "missing_image", "bad-empty": "empty_text",
                       "bad-long": "text_too_long"}
    details = dict(zip(rejects["row_id"].to_pylist(), rejects["detail"].to_pylist()))
    assert "nowhere.png" in details["bad-missing"] and "token" in details["bad-long"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 7 and summary["predicted"] == 3 and summary["rejected"] == 4
    assert summary["reasons"] == {"empty_text": 1, "missing_image": 1, "text_too_long": 1, "unreadable_image": 1}
    assert summary["metrics"] == {}  # a table carries no ground truth

    predictor = Predictor.from_checkpoint(registered["checkpoint"], device="cpu")
    by_id = {r["row_id"]: r for r in preds.to_pylist()}
    assert sorted(by_id) == ["g0", "g1", "g2"]
    for rid, path, text in [r for r in rows if r[0].startswith("g")]:
        want = prediction_to_record(predictor.predict(str(tmp_path / path) if not path.startswith("/") else path,
                                                      text))
        got = by_id[rid]
        assert got["mask"] == want["mask"] and got["no_target"] == want["no_target"]
        assert got["no_target_prob"] == pytest.approx(want["no_target_prob"], abs=1e-5)
        assert [i["mask"] for i in got["instances"]] == [i["mask"] for i in want["instances"]]
        assert [i["words"] for i in got["instances"]] == [i["words"] for i in want["instances"]]
        assert got["instances"], "the biased checkpoint keeps instances: the nested columns are exercised"
        assert got["iou"] is None


def test_prepared_split_logs_metrics_to_a_run_linked_to_the_version(registered, prepared_dataset, ray_local,
                                                                    one_thread, tmp_path):
    import mlflow

    from instalign.data.masks import rle_decode
    from instalign.data.parquet import read_manifest
    from pipelines.inference.batch import run
    from pipelines.inference.tables import REJECT_SCHEMA

    split = sorted(read_manifest(str(prepared_dataset))["files"])[0]
    out = tmp_path / "out"
    assert run(_args(registered, prepared_dataset, out, split=split, limit=12)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "prepared" and summary["rows"] == 12 and summary["rejected"] == 0
    preds = pq.read_table(out / "predictions").to_pylist()
    assert len(preds) == 12
    rejects = pq.read_table(out / "rejects")  # no bad row: an empty table, with its schema
    assert rejects.num_rows == 0 and rejects.schema.names == REJECT_SCHEMA.names
    for row in preds:
        assert row["iou"] is not None and 0.0 <= row["iou"] <= 1.0
        h, w = row["mask"]["size"]
        assert (h, w) == (row["height"], row["width"])
        assert rle_decode(row["mask"]["counts"], h, w).shape == (h, w)
    # gIoU is the mean of the per-sample IoUs written out (ReLA), here recomputed from the file.
    g_iou = 100.0 * float(np.mean([r["iou"] for r in preds]))
    assert summary["metrics"]["gIoU"] == pytest.approx(g_iou, abs=1e-9)
    # ... and every sample falls in its slice (single-, multi-, no-target), counted
    counts = summary["metrics"]
    assert counts["single.samples"] + counts["multi.samples"] + counts["no_target.samples"] == 12
    assert counts["no_target.samples"] == sum(r["gt_no_target"] for r in preds)

    client = mlflow.MlflowClient(registered["tracking_uri"])
    run_ = client.get_run(summary["mlflow_run_id"])
    assert run_.data.tags["instalign.model_name"] == MODEL
    assert run_.data.tags["instalign.model_version"] == registered["version"]
    assert run_.data.metrics["rows"] == 12
    # The run's summary.json lies beside the sqlite store, not in ./mlruns of whatever the cwd was.
    assert run_.info.artifact_uri.startswith((registered["root"] / "mlruns").resolve().as_uri())
    for key in ("gIoU", "cIoU"):
        if not math.isnan(summary["metrics"][key]):
            assert run_.data.metrics[key] == pytest.approx(summary["metrics"][key])


def test_out_must_be_new(registered, tmp_path, capsys):
    from pipelines.inference.batch import run

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    table = tmp_path / "t.csv"
    table.write_text("image_path,text\na.png,the ball\n")
    with pytest.raises(BatchPredictError, match="not an empty directory"):  # the CLI prints it in one line
        run(_args(registered, table, out))
    assert (out / "keep.txt").read_text() == "x"


def test_workers_that_leave_no_cpu_for_reading_are_refused(registered, ray_local, tmp_path, capsys):
    """2 × 0.75 CPUs on the 2-CPU test cluster leave 0.5 free: the 1-CPU read/write tasks could never
    run and the job would hang (measured before this check); it is refused with a message instead."""
    from pipelines.inference.batch import run

    table = tmp_path / "t.csv"
    table.write_text("image_path,text\na.png,the ball\n")
    with pytest.raises(BatchPredictError, match="would hang"):
        run(_args(registered, table, tmp_path / "out", num_workers=2, cpus_per_worker=0.75))


@pytest.mark.parametrize("model_cpus", [1.0, 0.5])
def test_decode_runs_as_tasks_not_inside_the_model_actor(ray_local, model_cpus, capsys, monkeypatch):
    """Ray Data fuses a task stage into the actor stage after it when their resources are equal:
    decoding then ran inside the model's process (measured). The optimized plan keeps them apart;
    with equal shares (the mistake) the same check sees them fused, so it can tell."""
    import ray
    import ray.data

    from pipelines.inference import batch
    from pipelines.inference.tables import INPUT_SCHEMA

    def plan() -> str:
        cfg = batch.BatchPredictConfig(model="m", data="d", out="o")
        ds = batch._stages(ray.data.from_arrow(INPUT_SCHEMA.empty_table()), ray.put(b""), cfg, cpus=model_cpus,
                           gpus=0.0, batch_size=8)
        capsys.readouterr()
        ds.explain()
        return capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]

    optimized = plan()
    assert "MapBatches(decode_rows)->MapBatches(ModelStage)" not in optimized
    assert "MapBatches(decode_rows)" in optimized and "ActorPoolMapOperator[MapBatches(ModelStage)]" in optimized
    monkeypatch.setattr(batch, "cpu_stage_cpus", lambda cpus: cpus)
    assert "MapBatches(decode_rows)->MapBatches(ModelStage)" in plan()
