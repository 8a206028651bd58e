"""``instalign bench model`` (``pipelines.bench.model``) on CPU at toy sizes: the rows it reports
are real measurements of a real training step; the speeds themselves live in docs/performance.md."""

from __future__ import annotations

import pytest

from pipelines.bench.command import BenchError

from pipelines.bench.model import synthetic_batch


def test_the_synthetic_batch_is_a_valid_batch_with_and_without_targets():
    batch = synthetic_batch(batch_size=6, image_size=32, max_tokens=8, vocab_size=50, seed=3)
    assert batch.images.shape == (6, 3, 32, 32) and batch.input_ids.shape == (6, 8)
    assert (batch.input_ids * (1 - batch.attention_mask) == 0).all()  # padding is token 0
    for masks, union, no_target in zip(batch.instance_masks, batch.union_masks, batch.no_target):
        assert bool(no_target) == (len(masks) == 0) and (union == (masks.any(0) if len(masks) else union)).all()
    again = synthetic_batch(batch_size=6, image_size=32, max_tokens=8, vocab_size=50, seed=3)
    assert (again.images == batch.images).all()  # same seed, same batch


def test_bench_model_runs_on_cpu(tmp_path, capsys):
    """``instalign bench model`` end to end on the tiny preset (real criterion and optimizer)."""
    import argparse
    import json

    from pipelines.bench import model as bench_model
    parser = argparse.ArgumentParser()
    bench_model.add_arguments(parser)
    out = tmp_path / "rows.json"
    args = parser.parse_args(["--config", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                              "--latency-iters", "1", "--device", "cpu", "--json", str(out),
                              "model.image_size=64", "model.backbone.kwargs.img_size=64"])
    assert bench_model.run(args) == 0
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "eager" and row["precision"] == "fp32" and row["image_size"] == 64
    assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["latency_ms_b1"] > 0 and row["params_M"] > 0
    assert "| tiny |" in capsys.readouterr().out


def test_bench_model_deform_memory_rows(tmp_path, capsys):
    """``instalign bench model --deform-memory`` counts reference vs lean at the config's sizes."""
    import argparse
    import json

    from pipelines.bench import model as bench_model
    parser = argparse.ArgumentParser()
    bench_model.add_arguments(parser)
    out = tmp_path / "rows.json"
    assert bench_model.run(parser.parse_args(["--config", "tiny", "--deform-memory", "--json", str(out)])) == 0
    rows = json.loads(out.read_text())
    op = {r["variant"]: r for r in rows if r["scope"] == "attention op"}
    module = {r["variant"]: r for r in rows if r["scope"] == "MSDeformAttn module"}
    assert rows[0]["batch"] == 1 and rows[0]["image_size"] == 128
    assert op["pytorch (default: recompute)"]["saved_bytes"] < op["reference (naive stack)"]["saved_bytes"]
    assert module["pytorch"]["saved_bytes"] < module["reference"]["saved_bytes"]
    assert "| attention op | reference (naive stack) |" in capsys.readouterr().out
    with pytest.raises(BenchError, match="BATCH must be >= 1"):
        bench_model.run(parser.parse_args(["--config", "tiny", "--deform-memory", "0"]))

