"""``instalign bench gpu``: the paper preset's speed on one GPU, in one JSON (issue 28's targets).

One command, one file, meant to finish within 8 minutes on one H100:

* **training** samples/s of the real engine step (``instalign.engine.train_one_epoch``: forward
  under the run's precision, the eq. 13 criterion with matching, backward, gradient clipping,
  AdamW) at ``--batch-size`` (32) and the config's image size (480² for ``paper``), eager and
  ``torch.compile``-d, each with its peak memory. The batches are synthetic and already on the
  device (``pipelines.bench.model.synthetic_batch``): this is the step, not the data path
  (``instalign bench data`` measures that);
* **inference** through ``instalign.predictor.Predictor`` (decode, resize, tokenise, forward,
  post-processing, copies back; compiled on CUDA by default): pairs/s of ``predict_batch`` at
  ``--batch-size``, and the p50/p99 latency of ``--requests`` single requests, on a 640×480 JPEG.

Weights are random (``pretrained=False`` for the backbone and the text encoder, the paper's
shapes): speed does not depend on them, and nothing is downloaded. bf16 autocast on CUDA
(``train.precision=auto``), fp32 on CPU, where the command runs as a smoke check (``--config tiny
--steps 2``); there "compiled" uses the ``aot_eager`` backend by default (graph capture and
AOTAutograd without inductor's C++ code generation, which takes minutes on a small CPU), and the
JSON says which backend it was. The figures go to docs/performance.md with the card and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instalign.config import load_config
from instalign.engine import resolve_precision, train_one_epoch
from instalign.errors import USAGE
from instalign.losses import build_criterion
from instalign.optim import build_optimizer
from pipelines.bench.command import BenchError
from pipelines.bench.model import build_bench_model, peak_bytes, sync_device, synthetic_batch
from pipelines.bench.predict import TEXT, build_predictor, request_image
from pipelines.core import flags
from pipelines.core.output_dirs import check_report_path

#: The JSON's measured figures: every one a finite number on any device.
FIGURES = (
    "train_eager_samples_per_s", "train_eager_step_s", "train_eager_peak_mem_GiB", "train_eager_warmup_s",
    "train_compiled_samples_per_s", "train_compiled_step_s", "train_compiled_peak_mem_GiB", "train_compiled_warmup_s",
    "infer_batch_pairs_per_s", "infer_single_p50_ms", "infer_single_p99_ms", "wall_s",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser, default="paper", help="a preset (paper, tiny) or a YAML file; random init")
    parser.add_argument("--batch-size", type=int, default=32, help="training and batched-inference batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per mode, and timed inference batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (compilation happens here)")
    parser.add_argument("--requests", type=int, default=100, help="timed single requests (p50/p99 latency)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--compile-backend", default="auto",
                        help="torch.compile backend of the compiled training step: auto = inductor on CUDA, "
                             "aot_eager on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-gpu.json", help="where the JSON goes")
    flags.add_overrides(parser)


def train_figures(cfg: Any, *, device: torch.device, batch_size: int, steps: int, warmup: int,
                  backend: str | None, seed: int) -> dict[str, Any]:
    """Samples/s, seconds per step and peak memory of the engine's training step; compiled with
    ``backend`` (``None``: eager). A fresh model per mode, so each peak is that mode's own."""
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(seed)
    model, text_name = build_bench_model(cfg.model)
    model = model.to(device).train()
    vocab = int(model.text_encoder.encoder.config.vocab_size)
    # No prepared split to balance an ``auto`` weight on; a number costs the same step time.
    loss_cfg = dataclasses.replace(cfg.loss, nt_pos_weight=1.0) if cfg.loss.nt_pos_weight == "auto" else cfg.loss
    criterion = build_criterion(loss_cfg).to(device)
    t = cfg.train
    optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, backbone_lr_mult=t.backbone_lr_mult,
                                text_encoder_lr_mult=t.text_encoder_lr_mult)
    runner = torch.compile(model, backend=backend) if backend else model
    batches = [synthetic_batch(batch_size=batch_size, image_size=cfg.model.image_size,
                               max_tokens=cfg.model.text_encoder.max_tokens, vocab_size=vocab,
                               seed=seed + i).to(device) for i in range(2)]

    def run(n: int) -> None:
        train_one_epoch(runner, criterion, optimizer, None, (batches[i % 2] for i in range(n)), device=device,
                        precision=precision, grad_clip=t.grad_clip, report=lambda metrics, step: None,
                        log_every=t.log_every_steps)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(warmup)
    sync_device(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    run(steps)
    sync_device(device)
    step_s = (time.perf_counter() - start) / steps
    peak = peak_bytes(device)
    return {"samples_per_s": batch_size / step_s, "step_s": step_s, "peak_mem_GiB": peak / 2**30,
            "warmup_s": warmup_s, "precision": precision, "text_encoder": text_name}


def inference_figures(predictor: Any, *, batch_size: int, batches: int, requests: int) -> dict[str, Any]:
    """Pairs/s of ``predict_batch`` and single-request latency percentiles, on one 640×480 JPEG.

    Every call returns host arrays, so it has synchronised with the device when it returns.
    """
    image = request_image(640, 480)
    images, texts = [image] * batch_size, [TEXT] * batch_size
    for _ in range(2):  # warm-up: compilation (CUDA) and allocator growth for this batch shape
        predictor.predict_batch(images, texts, batch_size=batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        predictor.predict_batch(images, texts, batch_size=batch_size)
    pairs_per_s = batch_size * batches / (time.perf_counter() - start)
    for _ in range(3):  # warm-up of the batch-1 shape
        predictor.predict(image, TEXT)
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        predictor.predict(image, TEXT)
        times.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(np.asarray(times) * 1e3, [50, 99])
    return {"infer_batch_pairs_per_s": pairs_per_s, "infer_single_p50_ms": float(p50),
            "infer_single_p99_ms": float(p99), "infer_requests": requests, "infer_batch_size": batch_size,
            "infer_compiled": bool(predictor.compiled), "infer_precision": predictor.precision}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> int:
    check_report_path(args.out)  # before minutes of measuring: never a file this project did not write
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.requests < 1:
        raise BenchError("gpu: --batch-size, --steps and --requests must be >= 1, --warmup >= 0", exit_code=USAGE)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    backend = args.compile_backend if args.compile_backend != "auto" else \
        ("inductor" if device.type == "cuda" else "aot_eager")
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "bench": "instalign bench gpu", "date": datetime.date.today().isoformat(), "device": _device_name(device),
        "torch": torch.__version__, "config": str(args.config), "overrides": list(args.overrides),
        "image_size": cfg.model.image_size, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "compile_backend": backend,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss (monotone: all so far)",
    }
    for mode, mode_backend in (("eager", None), ("compiled", backend)):
        figures = train_figures(cfg, device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                                backend=mode_backend, seed=args.seed)
        report["precision"], report["text_encoder"] = figures.pop("precision"), figures.pop("text_encoder")
        report.update({f"train_{mode}_{k}": v for k, v in figures.items()})
        print(f"train {mode}: {figures['samples_per_s']:.2f} samples/s, {figures['peak_mem_GiB']:.2f} GiB peak",
              flush=True)
        gc.collect()  # the mode's model, optimiser state and compiled graphs, before the next mode's peak
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(prefix="instalign-bench-gpu-") as tmp:
        predictor, notes = build_predictor(config=args.config, overrides=args.overrides, checkpoint=None,
                                           device=str(device), workdir=Path(tmp))
        report["infer_model"] = "; ".join(notes)
        report.update(inference_figures(predictor, batch_size=args.batch_size, batches=args.steps,
                                        requests=args.requests))
    report["wall_s"] = time.perf_counter() - started
    bad = [k for k in FIGURES if not (isinstance(report.get(k), (int, float)) and math.isfinite(report[k]))]
    if bad:
        raise BenchError(f"gpu: no finite figure for {bad}")
    text = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0
