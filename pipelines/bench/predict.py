"""``instalign bench predict``: serving speed of the Predictor (paper §3.6 inference).

Two numbers, end to end through ``instalign.predictor.Predictor`` — decode, resize and
normalise, tokenise, forward, no-target rule, upsampling to the original size, instance
masks and their words — on a synthetic JPEG request (default 640×480, a typical COCO
photo):

* **single-request latency**: ``predict(image, text)`` one at a time (mean, p50, p90);
* **batched throughput**: ``predict_batch`` with ``--batch-sizes`` requests per forward.

The model is the ``--config`` preset (``paper`` by default: Swin-B + RoBERTa-base at
480×480, N=100, K=9) with random weights, or ``--checkpoint``. Speed does not depend on
the weights, so random init measures the paper model without downloading anything; when
the text encoder's config is not available offline (``roberta-base`` on a machine without
the Hugging Face cache), an encoder of the same architecture (RoBERTa-base's published
dimensions) is built locally with the tiny BPE tokenizer, and the report says so. On CUDA
the predictor runs bf16 autocast (``precision=auto``), fp32 on CPU.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, RobertaConfig

from instalign.config import load_config
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer, resolve_source
from instalign.modeling.tiny_text import ensure_tiny_roberta
from instalign.predictor import Predictor
from pipelines.bench.command import BenchError
from pipelines.core import flags
from pipelines.core.output_dirs import check_report_path
#: roberta-base's config.json (the paper's text encoder), for an offline stand-in of the same shape.
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
TEXT = "the person on the left holding a red umbrella"


def _offline_text_encoder(cfg: Any, workdir: Path) -> str | None:
    """Point ``cfg`` at a local RoBERTa-base-shaped encoder when its own is not resolvable offline.

    Returns a note for the report, or ``None`` when the configured encoder loads as is.
    """
    try:
        AutoConfig.from_pretrained(resolve_source(cfg.model.text_encoder.name))
        return None
    except (OSError, ValueError):
        pass
    if cfg.model.text_encoder.name != "roberta-base":
        raise BenchError(f"predict: text encoder {cfg.model.text_encoder.name!r} is not available offline")
    local = workdir / "roberta-base-shape"
    local.mkdir(parents=True, exist_ok=True)
    RobertaConfig(**ROBERTA_BASE).save_pretrained(local)
    tiny = ensure_tiny_roberta()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tiny / name).is_file():
            (local / name).write_bytes((tiny / name).read_bytes())
    cfg.model.text_encoder.name = str(local)
    cfg.model.text_encoder.pretrained = False
    return "text encoder: roberta-base architecture (random init) with the tiny BPE tokenizer (offline)"


def build_predictor(*, config: str, overrides: list[str], checkpoint: str | None, device: str, workdir: Path):
    """(predictor, notes): from a checkpoint, or a random-init model of ``config``."""
    if checkpoint:
        return Predictor.from_checkpoint(checkpoint, device=device), [f"checkpoint {checkpoint}"]
    cfg = copy.deepcopy(load_config(config, overrides))
    cfg.model.backbone.pretrained = False
    notes = [f"{config} preset, random init"]
    note = _offline_text_encoder(cfg, workdir)
    if note:
        notes.append(note)
    cfg.model.text_encoder.pretrained = False
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return Predictor(model, cfg, load_tokenizer(cfg.model.text_encoder), device), notes


def request_image(width: int, height: int) -> bytes:
    """A JPEG with some structure (noise + shapes), as a client would send it."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width // 8, height // 4, width // 2, 3 * height // 4], fill=(215, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"mean_ms": 1e3 * statistics.fmean(times), "p50_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * p90}


def bench(predictor: Any, *, image: bytes, batch_sizes: list[int], iters: int, warmup: int) -> list[dict[str, Any]]:
    """Time ``predict`` (batch 1) and ``predict_batch`` (larger batches); returns one row per size."""
    rows = []
    for b in batch_sizes:
        images, texts = [image] * b, [TEXT] * b
        for _ in range(warmup):
            predictor.predict_batch(images, texts, batch_size=b)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            if b == 1:
                predictor.predict(image, TEXT)
            else:
                predictor.predict_batch(images, texts, batch_size=b)
            times.append(time.perf_counter() - t0)
        row = {"batch": b, "iters": iters, **_stats(times), "images_per_s": b * iters / sum(times)}
        rows.append(row)
    return rows


def _peak_memory(device: Any) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (peak allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS (process peak)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser, default="paper", help="a preset (paper, tiny) or a YAML file; random init")
    parser.add_argument("--checkpoint", default=None, help="time this checkpoint instead of a random-init config")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated; 1 = single-request latency")
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--image-size", default="640x480", help="request image WxH (the predictor resizes it)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    flags.add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    check_report_path(args.json)  # before the measurement: never a file this project did not write

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="instalign-bench-") as tmp:
        t0 = time.perf_counter()
        predictor, notes = build_predictor(config=args.config, overrides=args.overrides, checkpoint=args.checkpoint,
                                           device=str(device), workdir=Path(tmp))
        build_s = time.perf_counter() - t0
        rows = bench(predictor, image=request_image(width, height), batch_sizes=batch_sizes, iters=args.iters,
                     warmup=args.warmup)
    cfg = predictor.cfg.model
    params = sum(p.numel() for p in predictor.model.parameters())
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    header = {
        "model": "; ".join(notes), "params_M": round(params / 1e6, 1),
        "input": f"{cfg.image_size}x{cfg.image_size}, N={cfg.num_queries}, K={cfg.num_blocks}, "
                 f"L={cfg.text_encoder.max_tokens}", "request": f"{width}x{height} JPEG",
        "device": f"{device} ({hw})", "precision": predictor.precision, "build_s": round(build_s, 1),
        "memory": _peak_memory(device),
    }
    for k, v in header.items():
        print(f"{k:<10}: {v}")
    print(f"{'batch':>5} {'mean ms':>10} {'p50 ms':>10} {'p90 ms':>10} {'images/s':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['mean_ms']:>10.1f} {r['p50_ms']:>10.1f} {r['p90_ms']:>10.1f} "
              f"{r['images_per_s']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "results": rows}, indent=2))
    return 0
