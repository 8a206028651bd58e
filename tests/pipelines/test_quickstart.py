"""``instalign quickstart`` end to end, as a user runs it: a fresh process, nothing running.

Smaller than the default run (60 images, 2 epochs: each stage's outputs and one validation
per epoch are what is checked, not the numbers) but the same stages: synthetic
gRefCOCO → Ray Data prepare → Ray Train (2 CPU workers) → Ray Data evaluation of the
registered candidate against the trivial baselines → the promotion gate (its rule written on
the model version; champion only if it passes, which this short run need not) → pyfunc load
by alias → overlay. Slow (a few minutes on 2 cores): marked ``slow``. The default run's
numbers are measured by hand and stated in README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


#: More than one epoch, so that one validation per epoch is seen to repeat.
EPOCHS = 2


@pytest.mark.ray  # its own private cluster, in the child process
@pytest.mark.slow
def test_quickstart_trains_registers_promotes_and_serves(tmp_path):
    workdir = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # System metrics every second (default: a point a minute), so this short run has some.
    env.update(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1", MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "quickstart", "--workdir", str(workdir), "--num-images", "60",
         "--epochs", str(EPOCHS)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode in (0, 1) and (workdir / "summary.json").is_file(), (out[-4000:], proc.stderr[-4000:])

    # Progress, the comparison with the baselines and the summary are on stdout.
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out
    # Rank 0's progress lines (pipelines.training.progress) reach the quickstart's terminal: one per
    # validation, and training lines with the ETA.
    progress = [line for line in out.splitlines() if "[train] " in line]
    assert sum(" val at step " in line for line in progress) == EPOCHS, out[-4000:]
    assert any(f"[train] epoch {EPOCHS}/{EPOCHS} step " in line and "ETA" in line and "samples/s" in line
               for line in progress)
    assert "always no-target" in out and "always empty" in out
    # No Python warning from inside Ray a user cannot act on (Ray Train's exclude_resources one
    # came through the driver in the ordered data order the quickstart uses).
    assert "RayDeprecationWarning" not in out + proc.stderr, proc.stderr[-4000:]
    # Nor Ray core's advisory that every Ray Data actor pool triggers (prepare, evaluation: in the
    # workdir's ray-driver-advisories.log instead), nor the raylet's 4x worker note on 2 cores.
    assert "core_worker" not in out + proc.stderr, proc.stderr[-4000:]
    assert "worker processes have been started" not in out + proc.stderr, proc.stderr[-4000:]
    assert "has constructor arguments in the object store" in (workdir / "ray-driver-advisories.log").read_text()
    db = workdir / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out

    # The closing lines are commands a fresh shell runs as printed: the environment's own
    # scripts (no activated venv on PATH), a real image of this run, and a serve line.
    predict_line = next(line.strip() for line in out.splitlines() if " predict --model " in line)
    assert "IMAGE" not in predict_line and any(" serve --model " in line for line in out.splitlines())
    shell_env = {k: v for k, v in env.items() if k not in ("PATH", "VIRTUAL_ENV")}
    shell = subprocess.run(["bash", "-c", predict_line], env={**shell_env, "PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert shell.returncode == 0, (predict_line, shell.stderr[-3000:])
    assert (workdir / "predicted.png").is_file()

    summary = json.loads((workdir / "summary.json").read_text())
    from pipelines.evaluation.promote import decide

    val, base = summary["val"], summary["baselines"]
    decision = decide(val, None, base)  # a fresh workdir: no champion yet, the baselines alone decide
    promoted, rule = decision.passed, decision.text
    assert summary["promoted"] is promoted and summary["promotion_gate"] == rule
    assert proc.returncode == (0 if promoted else 1)  # the exit status says whether it became champion
    assert base["always empty"]["gIoU"] == 0.0  # ReLA: an empty guess scores nothing
    assert base["always empty"]["N_acc"] == 0.0 and base["always no-target"]["T_acc"] == 0.0
    assert 0.0 <= val["nt_AUROC"] <= 100.0
    assert summary["nt_pos_weight"] > 1.0  # balanced from the train split's no-target share
    assert summary["model_uri"] == f"models:/instalign-quickstart@{'champion' if promoted else 'candidate'}"
    assert Path(summary["best_checkpoint"]).is_dir()

    # The registry holds the rule in the version's description and the alias only if the gate passed
    # (read back with a fresh client on the sqlite file).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    version = client.get_model_version("instalign-quickstart", str(summary["model_version"]))
    assert rule in version.description and version.run_id == summary["mlflow_run_id"]
    assert "always no-target" in version.description  # the metrics beside the baselines
    assert ("champion" in version.aliases) is promoted
    assert version.tags["instalign.promotion"] == rule[:5000]

    # The training run: the prepared dataset as its input, system metrics from the workers' node.
    run = client.get_run(summary["mlflow_run_id"])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic-grefcoco"]  # not the real gRefCOCO
    assert "system/node_0/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    # The evaluation: its own run, linked to the version it evaluated.
    evaluation = client.get_run(summary["evaluation_run_id"])
    assert evaluation.data.tags["instalign.model_version"] == str(summary["model_version"])
    assert evaluation.data.metrics["val_gIoU"] == pytest.approx(val["gIoU"])

    from PIL import Image

    overlay = Path(summary["overlay"])
    assert overlay.parent == workdir and overlay.is_file()
    with Image.open(overlay) as img:
        assert img.format == "PNG" and img.width > 0
