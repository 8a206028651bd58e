"""``instalign bench gpu`` (``pipelines.bench.gpu``) on CPU at toy sizes: one JSON with every
figure a finite number, from real training steps and real predictions. Its GPU figures live in
docs/performance.md."""

from __future__ import annotations

import json
import math

import pytest


from pipelines.bench.command import BENCHES
from pipelines.bench.gpu import FIGURES
from pipelines.cli import main


@pytest.mark.slow
def test_bench_gpu_writes_one_json_with_every_figure_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--config", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                 "--requests", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in FIGURES:
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]) and report[key] > 0, key
    assert report["train_compiled_step_s"] > 0 and report["compile_backend"] == "aot_eager"  # CPU default
    assert report["precision"] == "fp32" and report["infer_compiled"] is False  # CPU: eager serving
    assert report["infer_single_p99_ms"] >= report["infer_single_p50_ms"]
    assert report["batch_size"] == 2 and report["image_size"] == 128 and report["config"] == "tiny"
    assert '"train_eager_samples_per_s"' in capsys.readouterr().out


def test_bench_gpu_is_a_bench_and_refuses_bad_counts(tmp_path, capsys):
    assert "gpu" in BENCHES
    assert main(["bench", "gpu", "--config", "tiny", "--steps", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "instalign bench: gpu: --batch-size, --steps and --requests must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
