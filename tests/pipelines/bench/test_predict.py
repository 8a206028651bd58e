"""``instalign bench predict`` (``pipelines.bench.predict``) on CPU with the tiny preset: real
predictions timed, the rows and the report it writes."""

from __future__ import annotations

import argparse
import io
import json

from PIL import Image

from pipelines.bench import predict as bench_predict
from tests.support.tiny_checkpoint import make_checkpoint


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_predict.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_request_image_is_a_jpeg_of_the_asked_size():
    image = Image.open(io.BytesIO(bench_predict.request_image(64, 48)))
    assert (image.format, image.size) == ("JPEG", (64, 48))


def test_a_checkpoint_is_timed_at_each_batch_size(tmp_path, capsys, one_thread):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "bench.json"
    assert bench_predict.run(parse("--checkpoint", str(checkpoint), "--device", "cpu", "--batch-sizes", "2,1",
                                   "--iters", "1", "--warmup", "0", "--image-size", "64x48",
                                   "--json", str(out))) == 0
    report = json.loads(out.read_text())
    assert report["model"] == f"checkpoint {checkpoint}" and report["request"] == "64x48 JPEG"
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert all(r["iters"] == 1 and r["mean_ms"] > 0 and r["images_per_s"] > 0 for r in report["results"])
    assert "images/s" in capsys.readouterr().out
