"""``instalign predict`` on a checkpoint directory: report, JSON, overlay, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.support.tiny_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("predict") / "ckpt", score_bias=2.0, no_target_bias=-2.0)


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.jpg"
    Image.fromarray(rng.integers(0, 255, size=(72, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_report_and_overlay(checkpoint, image_path, tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "overlay.png"
    rc = main(["predict", "--model", str(checkpoint), "--image", str(image_path), "--text", "the red circle",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "no target  : no" in printed and "instances  :" in printed and "score" in printed
    assert f"overlay    : {out}" in printed
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width == 96 and img.height > 72  # the image at its size plus the title strip


def test_json_matches_the_predictor(checkpoint, image_path, capsys):
    from instalign.data.masks import rle_decode
    from instalign.predictor import Predictor
    from pipelines.cli import main

    rc = main(["predict", "--model", str(checkpoint), "--image", str(image_path), "--text", "all the squares",
               "--json", "--device", "cpu"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    expected = Predictor.from_checkpoint(checkpoint, device="cpu").predict(str(image_path), "all the squares")
    assert record["text"] == "all the squares" and record["mask"]["size"] == [72, 96]
    np.testing.assert_array_equal(rle_decode(record["mask"]["counts"], 72, 96), expected.mask)
    assert record["no_target"] == expected.no_target
    assert [i["score"] for i in record["instances"]] == pytest.approx([i.score for i in expected.instances])
    assert "overlay" not in record


@pytest.mark.parametrize("args, message", [
    (["--image", "/nonexistent.png", "--text", "the dog"], "image '/nonexistent.png' does not exist"),
    (["--image", "/dev/zero", "--text", "the dog"], "image '/dev/zero' cannot be read: not a regular file"),
    (["--text", ""], "'text' must be a non-empty string"),
    (["--text", "the big red circle " * 8], "longer than the model's limit of 20"),
])
def test_bad_inputs(checkpoint, image_path, capsys, args, message):
    from pipelines.cli import main

    argv = ["predict", "--model", str(checkpoint), "--device", "cpu"]
    if "--image" not in args:
        argv += ["--image", str(image_path)]
    assert main(argv + args) == 1
    assert message in capsys.readouterr().err


def test_not_an_image_and_not_a_checkpoint(checkpoint, tmp_path, capsys):
    from pipelines.cli import main

    bogus = tmp_path / "notes.png"
    bogus.write_text("not a picture")
    assert main(["predict", "--model", str(checkpoint), "--image", str(bogus), "--text", "a dog"]) == 1
    assert "is not a readable image" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--image", str(bogus), "--text", "a dog"]) == 1
    assert "incomplete" in capsys.readouterr().err


def test_bench_predict_reports_latency_and_throughput(tmp_path, capsys):
    """The benchmark runs end to end and reports what it measured (no speed is asserted here)."""
    from pipelines.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "predict", "--config", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--iters", "2",
                 "--warmup", "0", "--image-size", "80x60", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "fp32" and report["request"] == "80x60 JPEG"
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["iters"] == 2 and r["mean_ms"] > 0 and r["images_per_s"] > 0
    assert "images/s" in capsys.readouterr().out


def test_out_replaces_only_an_image(checkpoint, image_path, tmp_path, capsys):
    """``--out`` used to overwrite any file, the input image included; now only an image (an
    earlier overlay) or a new file, and the refusal comes before the model is loaded."""
    from pipelines.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    argv = ["predict", "--model", str(checkpoint), "--image", str(image_path), "--text", "the dog", "--device", "cpu"]
    assert main(argv + ["--out", str(notes)]) == 1
    err = capsys.readouterr().err
    assert f"output {notes} exists and is not an image; refusing to replace" in err and "Traceback" not in err
    assert main(argv + ["--out", str(image_path)]) == 1
    assert "is the input" in capsys.readouterr().err
    assert notes.read_text() == "my notes" and Image.open(image_path).size == (96, 72)
    overlay = tmp_path / "overlay.png"
    Image.new("RGB", (4, 4)).save(overlay)  # an earlier overlay: replaced
    assert main(argv + ["--out", str(overlay)]) == 0
    assert Image.open(overlay).size != (4, 4)


def test_bench_json_replaces_only_a_json_report(tmp_path, capsys):
    """Every benchmark's ``--json`` is checked before it measures: a user's file is never overwritten."""
    from pipelines.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for bench in ("predict", "model", "data"):
        assert main(["bench", bench, "--json", str(notes)]) == 1
        assert f"output {notes} exists and is not a JSON report; refusing to replace" in capsys.readouterr().err
    assert main(["bench", "predict", "--json", str(tmp_path)]) == 1
    assert "exists and is not a regular file" in capsys.readouterr().err
    assert notes.read_text() == "my notes"


def test_one_image_is_never_compiled_for(checkpoint, image_path, monkeypatch, capsys):
    """``instalign predict --image`` runs one forward: the predictor it builds is eager on any
    device (on a GPU the default would compile first, tens of seconds, for a single answer)."""
    from instalign.predictor import Predictor
    from pipelines.cli import main

    seen = []
    real_init = Predictor.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("compile", "auto"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "__init__", spy)
    assert main(["predict", "--model", str(checkpoint), "--image", str(image_path), "--text", "the red circle",
                 "--device", "cpu"]) == 0
    assert seen == [False]
