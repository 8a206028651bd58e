"""``instalign quickstart`` end to end, as a user runs it: a fresh process, nothing running.

Smaller than the default run (fewer images and epochs) but the same stages: synthetic
gRefCOCO → Ray Data prepare → Ray Train (2 CPU workers) → Ray Data evaluation of the
registered candidate against the trivial baselines → promotion to champion → pyfunc load by
alias → overlay. Slow (a few minutes on 2 cores): marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_trains_registers_promotes_and_serves(tmp_path):
    workdir = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "quickstart", "--workdir", str(workdir), "--num-images", "120",
         "--epochs", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, (out[-4000:], proc.stderr[-4000:])

    # Progress, the comparison with the baselines and the summary are on stdout.
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out
    assert "always no-target" in out and "always empty" in out
    db = workdir / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["promoted"] is True
    best_baseline = max(m["gIoU"] for m in summary["baselines"].values())
    assert summary["val"]["gIoU"] > best_baseline  # it learned: the gate that promoted it
    assert summary["baselines"]["always empty"]["gIoU"] == 0.0  # ReLA: an empty guess scores nothing
    assert summary["model_uri"] == "models:/instalign-quickstart@champion"
    assert Path(summary["best_checkpoint"]).is_dir()

    # The registry really holds the alias (read back with a fresh client on the sqlite file).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    champion = client.get_model_version_by_alias("instalign-quickstart", "champion")
    assert str(champion.version) == str(summary["model_version"])
    assert champion.run_id == summary["mlflow_run_id"]

    from PIL import Image

    overlay = Path(summary["overlay"])
    assert overlay.parent == workdir and overlay.is_file()
    with Image.open(overlay) as img:
        assert img.format == "PNG" and img.width > 0
